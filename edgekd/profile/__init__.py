"""Profile and select: per-layer costs, arena planning, flash and latency estimates, host timings, reports."""
