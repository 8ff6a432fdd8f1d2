# Two entry points (see README): `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA_PKG := dataset-fashion-mnist

.PHONY: setup data demo test test-fast test-slow test-cuda clean

$(BIN)/edgekd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision come from the pinned pair in pyproject.toml; the export extra pins the TFLite/ONNX toolchain,
	# the nncf extra NNCF (edgekd quantize)
	$(BIN)/pip install --quiet -e '.[test,export,nncf]'
	touch $(BIN)/edgekd

setup: $(BIN)/edgekd data

# Fashion-MNIST from Debian (offline mirror); skipped with a note where apt is not available or not root
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq $(DATA_PKG) >/dev/null || (apt-get update -qq && apt-get install -y -qq $(DATA_PKG)); \
	else echo "note: install Fashion-MNIST with 'sudo apt-get install $(DATA_PKG)' or pass --data fashion-mnist:DIR"; fi

# The main job on the built-in default: teacher + distilled student for a Cortex-M7 on Fashion-MNIST, then the
# student exported as a verified full-int8 TFLite model (run in TFLite Micro) with its C array, and its profile
demo: setup
	$(BIN)/edgekd train --target cortex-m7 --data fashion-mnist --resolution 32 --limit 10000 \
		--teacher resnet18 --teacher-epochs 5 --epochs 10 --run-dir runs/demo-cortex-m7
	$(BIN)/edgekd export runs/demo-cortex-m7 --target cortex-m7
	$(BIN)/edgekd profile runs/demo-cortex-m7

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# on a machine with a CUDA GPU: AMP, the fp16 loss scaler, every method, NCCL DDP (tests/test_cuda.py)
test-cuda: setup
	$(BIN)/python -m pytest -q -m cuda

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
