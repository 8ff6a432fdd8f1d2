"""Memory and flash estimates of a graph for a full-int8 TFLite Micro deployment (and plain byte counts otherwise).

- Activations: the greedy arena plan of the graph's non-constant tensors (edgekd.profile.memory), what TFLite
  Micro calls the arena's "head". Exact when the graph is read from the .tflite file itself.
- Persistent arena ("tail"): TFLite Micro's per-tensor and per-node structs, per-channel requantisation
  arrays (an int32 multiplier and shift per output channel of every conv) and each kernel's op data. The
  coefficients are fitted to the recording allocator's numbers for the zoo at 32 and 64 px
  (tools/measure_tflm.py -> profiles/calibration/tflm-measurements.jsonl; `python tools/fit_profiler.py`
  prints the fit and its error). They are for TFLM's reference kernels on a 64-bit host: on a 32-bit MCU the
  structs are smaller, so the figure is conservative there.
- Flash: the .tflite file: int8 kernels, int32 biases, per-channel scale (float32) + zero point (int64) for the
  weights and biases of every conv, plus flatbuffer tables per tensor and operator (fitted the same way).
  The firmware's interpreter and kernel code come on top (not part of the model).
"""
from __future__ import annotations

from collections import Counter

from ..resources import data_dir
from .graph import BYTES_PER_ELEMENT, Graph
from .memory import Buffer, Plan, plan_greedy

# the recording allocator's numbers the coefficients below were fitted to (shipped with the package)
MEASUREMENTS = data_dir("calibration") / "tflm-measurements.jsonl"

# TFLite Micro's persistent arena ("tail") on a 64-bit host: struct sizes read off its recording allocator
# (TfLiteEvalTensor 24 B per tensor, NodeAndRegistration 64 B per operator) and its source (an int32 multiplier
# and an int32 shift per conv output channel); the op data each kernel keeps, per operator kind, is fitted by
# `python tools/fit_profiler.py --memory profiles/calibration/tflm-measurements.jsonl` (non-negative least squares).
TAIL_FIXED = {"tensors": 24.0, "ops": 64.0, "quant_channels": 8.0}
TAIL_OP_DATA = {"constant": 0.0, "DEPTHWISE_CONV_2D": 445.8, "HARD_SWISH": 862.7, "LOGISTIC": 135.1}
# Planning needs temporary memory that the activations later reuse: an AllocationInfo (32 B) per tensor and the
# greedy planner's per-buffer lists (40 B) per activation tensor; when that exceeds the activations the minimal
# arena grows by the difference (the constant is from the smallest-head model measured by bisection, tests/).
PLANNING_BYTES = {"tensors": 32.0, "activation_tensors": 40.0, "constant": 1576.0}
# .tflite bytes beyond the raw constants (int8 kernels, int32 biases): per-channel scale + zero point of weights
# and biases, flatbuffer tables per tensor, fixed metadata; fitted by the same tool (least squares)
FLASH_COEFFICIENTS = {"constant": 4888.44, "tensors": 266.20, "quant_channels": 19.72}
PERSISTENT_NOTE = ("SRAM = planned activations + TFLite Micro's persistent allocations as measured with its reference "
                   "kernels on a 64-bit host; 32-bit MCU structs are smaller, optimised kernels may add scratch")


def activation_buffers(graph: Graph, precision: str) -> list[Buffer]:
    per_element = BYTES_PER_ELEMENT[precision]
    return [Buffer(name, graph.tensors[name].elements * per_element, first, last)
            for name, (first, last) in graph.lifetimes().items()]


def plan(graph: Graph, precision: str) -> Plan:
    return plan_greedy(activation_buffers(graph, precision))


def features(graph: Graph) -> dict[str, float]:
    """What the overhead models are linear in."""
    kinds = Counter(op.kind for op in graph.ops)
    constants = graph.constant_tensors
    if constants is None:
        constants = sum(_constants(op) for op in graph.ops)
    return {
        "tensors": float(len(graph.tensors) + constants),
        "activation_tensors": float(len(graph.tensors)),
        "ops": float(len(graph.ops)),
        "quant_channels": float(sum(op.quant_channels for op in graph.ops)),
        "fc_channels": float(sum(graph.tensors[op.output].shape[-1] for op in graph.ops
                                 if op.kind == "FULLY_CONNECTED")),
        "constant_bytes": float(graph.constant_bytes if graph.constant_bytes is not None else graph.weight_bytes("int8")),
        **{f"op:{kind}": float(n) for kind, n in kinds.items()},
    }


def _constants(op) -> int:
    """Constant tensors an op carries in a .tflite (weights, biases, paddings, axes, scalar operands)."""
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        return 1 + (1 if op.bias_elements else 0)
    if op.kind in ("ADD", "MUL", "SUB"):
        return 1 if len(op.inputs) == 1 else 0
    return 1 if op.kind in ("PAD", "MEAN") else 0


def _linear(f: dict[str, float], coefficients: dict[str, float]) -> float:
    return coefficients["constant"] + sum(c * f.get(name, 0.0) for name, c in coefficients.items() if name != "constant")


def tail_bytes(graph: Graph) -> int:
    f = features(graph)
    op_data = {("constant" if kind == "constant" else f"op:{kind}"): c for kind, c in TAIL_OP_DATA.items()}
    return int(round(_linear(f, TAIL_FIXED | {"constant": 0.0}) + _linear(f, op_data)))


def planning_bytes(graph: Graph) -> int:
    return int(round(_linear(features(graph), PLANNING_BYTES)))


def flash_bytes(graph: Graph, precision: str) -> int:
    if precision != "int8":
        return graph.weight_bytes(precision)
    f = features(graph)
    return int(round(f["constant_bytes"] + _linear(f, FLASH_COEFFICIENTS)))


def estimate_graph(graph: Graph, precision: str) -> dict:
    """MACs, params and memory of `graph` deployed at `precision` (bytes)."""
    arena = plan(graph, precision)
    out = {
        "macs": graph.macs,
        "params": graph.params,
        "weight_bytes": graph.weight_bytes(precision),
        "activation_bytes": arena.peak_bytes,
        "flash_bytes": flash_bytes(graph, precision),
        "ops": len(graph.ops),
        "features": features(graph),
    }
    if precision == "int8":
        out["persistent_bytes"] = tail_bytes(graph)
        out["planning_bytes"] = planning_bytes(graph)
        out["arena_bytes"] = max(arena.peak_bytes, out["planning_bytes"]) + out["persistent_bytes"]
    return out
