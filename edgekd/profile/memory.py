"""Peak activation memory: the tensor-arena planner of TFLite Micro, reimplemented.

TFLite Micro (`GreedyMemoryPlanner`) plans the non-constant tensors of a graph into one arena: each tensor
lives from the operator that produces it (graph inputs: from the first operator) to the last operator that
reads it (graph outputs: to the end); sizes are rounded up to 16 bytes; buffers are placed largest first
(ties in original order), each at the lowest offset that does not overlap any already placed buffer whose
lifetime overlaps its own (lifetimes are inclusive). The arena's activation part is the highest end offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ALIGNMENT = 16  # MicroArenaBufferAlignment()


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int  # bytes before alignment
    first: int  # index of the first operator that needs it
    last: int  # index of the last operator that needs it (inclusive)


@dataclass(frozen=True)
class Plan:
    peak_bytes: int
    offsets: dict[str, int]
    # the operator at which the planned arena is fullest, and the buffers alive there
    peak_op: int
    live_at_peak: tuple[str, ...]


def align(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-int(size) // alignment) * alignment


def _overlap(a: Buffer, b: Buffer) -> bool:
    return not (a.first > b.last or b.first > a.last)


def plan_greedy(buffers: Sequence[Buffer]) -> Plan:
    """Offsets as TFLite Micro's greedy planner assigns them; peak = the arena's activation bytes."""
    for b in buffers:
        if b.size < 0 or b.first < 0 or b.last < b.first:
            raise ValueError(f"buffer {b.name!r} has an invalid size or lifetime ({b.size} B, {b.first}..{b.last})")
    order = sorted(range(len(buffers)), key=lambda i: -align(buffers[i].size))  # stable: ties keep their order
    placed: list[tuple[int, Buffer]] = []  # (offset, buffer), kept sorted by offset
    offsets: dict[str, int] = {}
    for i in order:
        wanted = buffers[i]
        size = align(wanted.size)
        candidate = 0
        for offset, other in placed:
            if not _overlap(wanted, other):
                continue
            if offset - candidate >= size:
                break  # the gap before this buffer is big enough
            candidate = max(candidate, offset + align(other.size))
        offsets[wanted.name] = candidate
        placed.append((candidate, wanted))
        placed.sort(key=lambda item: item[0])
    peak = max((offsets[b.name] + align(b.size) for b in buffers), default=0)
    # where the arena is fullest by live bytes (the plan's peak may exceed it through fragmentation)
    ops = range(max((b.last for b in buffers), default=-1) + 1)
    peak_op = max(ops, key=lambda op: sum(align(b.size) for b in buffers if b.first <= op <= b.last), default=0)
    live = tuple(b.name for b in buffers if b.first <= peak_op <= b.last)
    return Plan(peak, offsets, peak_op, live)


def lower_bound(buffers: Sequence[Buffer]) -> int:
    """The most bytes alive at once: no planner can do better than this."""
    ops = range(max((b.last for b in buffers), default=-1) + 1)
    return max((sum(align(b.size) for b in buffers if b.first <= op <= b.last) for op in ops), default=0)
