# Two entry points (see README): `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA_PKG := dataset-fashion-mnist

.PHONY: setup data browser demo test test-fast test-slow test-cuda clean

$(BIN)/edgekd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision come from the pinned pair in pyproject.toml; the export extra pins the TFLite/ONNX toolchain,
	# the nncf extra NNCF (edgekd quantize), the ray extra the parallel sweep of edgekd run
	$(BIN)/pip install --quiet -e '.[test,export,nncf,ray]'
	touch $(BIN)/edgekd

setup: $(BIN)/edgekd data

# Fashion-MNIST from Debian (offline mirror); skipped with a note where apt is not available or not root
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq $(DATA_PKG) >/dev/null || (apt-get update -qq && apt-get install -y -qq $(DATA_PKG)); \
	else echo "note: install Fashion-MNIST with 'sudo apt-get install $(DATA_PKG)' or pass --data fashion-mnist:DIR"; fi

# Chromium for the test that opens edgekd run's HTML report in a real browser (skipped without it)
browser:
	@if command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq chromium-headless-shell >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium-headless-shell); \
	else echo "note: the HTML report test needs 'sudo apt-get install chromium-headless-shell'"; fi

# The main job on the built-in default (Fashion-MNIST, Cortex-M7): `edgekd run` takes the project's Fashion-MNIST
# teacher (EfficientNet-Lite0 at 64 px, 93.0%, trained by tools/bench_distill_pays.py and kept in bench-runs/),
# caches its outputs once, distils 3 students spread along the target's cost front (2 at a time on a local Ray
# instance), exports each as a verified full-int8 TFLite model (run in TFLite Micro) with its C array, profiles
# them and recommends one (runs/demo-cortex-m7/report.md, report.html). Run it again: it resumes.
DEMO_TEACHER := bench-runs/bench_distill_pays/teacher-full/teacher
demo: setup
	$(BIN)/edgekd run --target cortex-m7 --data fashion-mnist --resolution 32 --limit 20000 --workers 2 \
		--teacher $(DEMO_TEACHER) --out runs/demo-cortex-m7

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup browser
	$(BIN)/python -m pytest -q -m slow

# on a machine with a CUDA GPU: AMP, the fp16 loss scaler, every method, NCCL DDP (tests/test_cuda.py)
test-cuda: setup
	$(BIN)/python -m pytest -q -m cuda

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
