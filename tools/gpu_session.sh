#!/usr/bin/env bash
# The one script a lent GPU session runs: `bash tools/gpu_session.sh` in the repo root, on a single-GPU H100/H200
# machine, within ~10 minutes (the timeouts below sum to 525 s). It runs
#   1. the CUDA tests (`pytest -m cuda -x`, tests/test_cuda.py), capped at 240 s, junit XML and log to $OUT;
#   2. tools/bench_gpu.py --budget-s 240: tiny-student training images/s against the GPU's compute limit, which
#      writes the "gpu-throughput" section of docs/benchmarks.md; that file and the raw JSON go to $OUT.
# Python: .venv/bin/python where a carried venv works, else the machine's python3 with this checkout on PYTHONPATH
# (edgekd runs from source; nothing is installed). Fashion-MNIST: a copy of its IDX files in .data/fashion-mnist
# (carried, ignored by git) is used when present; the machine's own install is found by the benchmark; else the
# built-in digits set. $OUT: where the device tool collects files (default runs/gpu_session).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; fi
{ echo "python: $PY"; $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')";
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1; } | tee "$OUT/session.log"

timeout 240 $PY -m pytest -q -m cuda -x tests/test_cuda.py --junitxml="$OUT/cuda-tests.xml" 2>&1 \
  | tee "$OUT/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}

data=()
if [ -d .data/fashion-mnist ]; then data=(--data fashion-mnist:.data/fashion-mnist); fi
timeout 285 $PY tools/bench_gpu.py --budget-s 240 "${data[@]}" 2>&1 | tee "$OUT/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}
cp docs/benchmarks.md "$OUT/benchmarks.md"

echo "cuda tests exit $tests_rc (124: timed out), bench_gpu exit $bench_rc" | tee -a "$OUT/session.log"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
