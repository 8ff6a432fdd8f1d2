"""The int8 model in the real TFLite Micro interpreter (the `tflite-micro` package) on this host.

- `list_ops`: the builtin ops the flatbuffer uses, read from the file itself.
- `run`: one interpreter in a child process (see _tflm_run.py); a missing kernel is reported by TFLM with the
  op's name, which becomes a one-line error.
- `find_arena`: the smallest tensor arena that allocates and reproduces the outputs, by bisection with a
  fresh child per probe (too small an arena can abort the process).
- `build_micro`: all of that for an exported int8 model, plus TFLM-vs-LiteRT agreement and the C array.

The arena is measured with TFLM's reference kernels on a 64-bit host. On a 32-bit MCU the interpreter's own
structs are smaller, but optimised kernels (CMSIS-NN, ESP-NN) can ask for scratch buffers the reference
kernels do not, so firmware should keep some headroom above the recorded figure.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgekdError

WORKER = Path(__file__).with_name("_tflm_run.py")
LARGE_ARENA = 32 << 20  # far above any model edgekd trains; the bisection starts from what it really used
ALIGN = 16  # TFLM aligns the arena to 16 bytes; probing finer than that measures nothing
PROBE_TIMEOUT_S = 120
# ops TFLite Micro lacks that known PyTorch layers turn into, with the fix
_HINTS = {
    "RELU_0_TO_1": "it comes from nn.Hardsigmoid/nn.Hardswish: write them as relu6(x + 3) / 6 "
                   "(edgekd.models.layers.HardSigmoid/HardSwish)",
}


def list_ops(path: Path) -> dict[str, int]:
    """{builtin op name: number of uses} from the .tflite flatbuffer (custom ops as CUSTOM:name)."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    counts: Counter = Counter()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = names.get(builtin, f"BUILTIN_{builtin}")
            if name == "CUSTOM":
                name = f"CUSTOM:{(code.CustomCode() or b'').decode()}"
            counts[name] += 1
    return dict(sorted(counts.items()))


@dataclass
class Run:
    ok: bool
    returncode: int
    stderr: str
    outputs: np.ndarray | None = None
    allocated_bytes: int | None = None  # TFLM's RecordingMicroAllocator total
    missing_ops: list[str] = field(default_factory=list)


def run(path: Path, arena_bytes: int, inputs: np.ndarray | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Run:
    """One interpreter with `arena_bytes` in a child process; runs `inputs` (N, 1, H, W, C) when given."""
    with tempfile.TemporaryDirectory(prefix="edgekd-tflm-") as tmp:
        cmd = [sys.executable, str(WORKER), str(path), str(int(arena_bytes))]
        out_file = Path(tmp) / "outputs.npy"
        if inputs is not None:
            np.save(Path(tmp) / "inputs.npy", inputs)
            cmd += [str(Path(tmp) / "inputs.npy"), str(out_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Run(False, -1, f"timed out after {timeout_s:.0f} s")
        ok = proc.returncode == 0 and '"ok": true' in proc.stdout
        total = re.search(r"Arena allocation total (\d+) bytes", proc.stderr)
        missing = re.findall(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'", proc.stderr)
        missing += [f"CUSTOM:{m}" for m in re.findall(r"Didn't find op for custom opcode '([^']+)'", proc.stderr)]
        outputs = np.load(out_file) if ok and inputs is not None else None
        return Run(ok, proc.returncode, proc.stderr, outputs, int(total.group(1)) if total else None,
                   sorted(set(missing)))


def _failure(run_: Run) -> str:
    lines = [line.strip() for line in run_.stderr.splitlines() if line.strip()]
    if run_.returncode < 0:
        return f"the interpreter crashed (signal {-run_.returncode})"
    return lines[-1][:160] if lines else f"exit {run_.returncode}"


def check_ops(path: Path) -> dict[str, int]:
    """The model's ops; raises naming the ops TFLite Micro has no kernel for."""
    ops = list_ops(path)
    probe = run(path, LARGE_ARENA)
    if probe.missing_ops:
        raise _missing(path, probe.missing_ops, ops)
    if not probe.ok:
        raise EdgekdError(f"TFLite Micro cannot load {Path(path).name} even with a {LARGE_ARENA >> 20} MiB arena "
                          f"({_failure(probe)}); ops: {', '.join(ops)}")
    return ops


def _missing(path: Path, missing: list[str], ops: dict[str, int]) -> EdgekdError:
    hints = "; ".join(f"{op}: {_HINTS[op]}" for op in missing if op in _HINTS)
    fix = hints or "replace the layers that produce them with ones TFLite Micro implements"
    return EdgekdError(f"TFLite Micro has no kernel for {', '.join(missing)} used by {Path(path).name} "
                       f"(model ops: {', '.join(ops)}): {fix}")


@dataclass
class Arena:
    bytes: int  # smallest arena that allocated and reproduced the outputs
    failing_bytes: int  # the next smaller probe (bytes - 16), which did not
    recorded_bytes: int | None  # what TFLM's recording allocator reported with a large arena
    probes: int
    seconds: float


def find_arena(path: Path, probe_input: np.ndarray, expected: np.ndarray) -> Arena:
    """Bisection over arena sizes (multiples of 16) between one that fails and one that works.

    "Works" means the interpreter allocated, invoked and gave exactly `expected` for `probe_input`
    (1, 1, H, W, C)."""
    started = time.perf_counter()
    probes = 0

    def works(size: int) -> bool:
        nonlocal probes
        probes += 1
        r = run(path, size, probe_input)
        return r.ok and r.outputs is not None and np.array_equal(r.outputs, expected)

    first = run(path, LARGE_ARENA, probe_input)
    probes += 1
    if not first.ok:
        raise EdgekdError(f"TFLite Micro failed on {Path(path).name} with a {LARGE_ARENA >> 20} MiB arena: {_failure(first)}")
    # TFLM's recorded total is close to the answer but not always enough (planning needs temporary memory
    # too): grow from it until a size works, or shrink while it keeps working, then bisect
    hi = _round_up(first.allocated_bytes or LARGE_ARENA // 2, ALIGN)
    lo = 0
    while not works(hi):
        lo = hi
        hi = _round_up(hi * 5 // 4, ALIGN)
        if hi >= LARGE_ARENA:
            hi = LARGE_ARENA
            break
    if lo == 0:
        lo = _round_up(hi // 2, ALIGN)
        while lo >= ALIGN and works(lo):
            hi, lo = lo, _round_up(lo // 2, ALIGN)
    while hi - lo > ALIGN:
        mid = (lo + hi) // (2 * ALIGN) * ALIGN
        if works(mid):
            hi = mid
        else:
            lo = mid
    return Arena(hi, hi - ALIGN, first.allocated_bytes, probes, round(time.perf_counter() - started, 2))


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_diff_lsb": int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())}


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def build_micro(job, artifact: Path, inputs_nhwc: np.ndarray, litert_raw: np.ndarray, io: dict) -> dict:
    """TFLM run on the verification images, arena bisection, target RAM check, C array (compiled)."""
    from .tflite2c import write_c_array
    from .verify import LiteRT, check, compare, dequantize

    job.say("running the int8 model in TFLite Micro and measuring its tensor arena")
    started = time.perf_counter()
    ops = list_ops(artifact)
    full = run(artifact, LARGE_ARENA, inputs_nhwc[:, None], timeout_s=PROBE_TIMEOUT_S + 0.1 * len(inputs_nhwc))
    if full.missing_ops:
        raise _missing(artifact, full.missing_ops, ops)
    if not full.ok:
        raise EdgekdError(f"TFLite Micro failed to run {artifact.name} ({_failure(full)}); ops: {', '.join(ops)}")
    tflm_raw = full.outputs.reshape(litert_raw.shape)
    out_q = io["output"]["quantization"]
    metrics = compare(job.reference_logits, dequantize(tflm_raw, out_q["scale"], out_q["zero_point"]), job.samples.test_y)
    metrics["runtime"] = "tflite-micro (reference kernels, host)"
    # TFLM's reference kernels must reproduce LiteRT's reference kernels; LiteRT's optimised ones round differently
    reference_raw = LiteRT(artifact, kernels="reference").raw(inputs_nhwc)
    metrics["vs_litert_reference_kernels"] = _agreement(tflm_raw, reference_raw)
    metrics["vs_litert_default_kernels"] = _agreement(tflm_raw, litert_raw)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    job.compare_with_float_source(metrics, dequantize(tflm_raw, out_q["scale"], out_q["zero_point"]))
    check(metrics, "int8", "TFLite Micro", min_agreement=job.min_agreement, detail=job.layer_hint)
    if metrics["vs_litert_reference_kernels"]["top1_agreement"] < job.min_agreement:
        raise EdgekdError(f"TFLite Micro and LiteRT's reference kernels agree on top-1 for only "
                          f"{metrics['vs_litert_reference_kernels']['top1_agreement']:.1%} of the test images: "
                          "the tflite-micro package does not run this model correctly; report it with the manifest")

    arena = find_arena(artifact, inputs_nhwc[:1, None], full.outputs[:1])
    job.check_ram(arena.bytes)
    c_array = write_c_array(artifact, job.stage, job.stem, arena_bytes=arena.bytes, io=io,
                            class_names=job.class_names)
    extra = {}
    if job.target is not None and job.target.runtime == "tflite-micro":  # a board to benchmark: its firmware source
        from .firmware import write_firmware
        from .tflite2c import c_identifier

        sym = c_identifier(job.stem)
        extra["firmware"] = write_firmware(job.stage, stem=job.stem, header=c_array["header"], symbol=sym,
                                           upper=sym.upper(), ops=ops, arena_bytes=arena.bytes,
                                           cpu_hz=job.target.compute.clock_hz)
    return {
        **extra,
        "tflm": {
            "ops": ops,
            "arena_bytes": arena.bytes,
            "arena_failing_bytes": arena.failing_bytes,
            "arena_recorded_bytes": arena.recorded_bytes,
            "arena_probes": arena.probes,
            "arena_search_s": arena.seconds,
            "arena_note": "measured with TFLM reference kernels on a 64-bit host; optimised MCU kernels "
                          "(CMSIS-NN, ESP-NN) may need extra scratch: keep headroom",
            "package": "tflite-micro",
        },
        "c_array": c_array,
        "verification_tflm": metrics,
    }
