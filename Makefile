# Two entry points for a fresh machine: `make run` (set up + main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/qandc: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch on machines without a GPU (never pull a CUDA build there); any admitted build elsewhere.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.11,<2.14"; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	# TensorRT 10.13's API stubs, which tests/test_tensorrt_types.py checks the TensorRT backend against: without their
	# dependencies (TensorRT itself) and outside site-packages, where their bare tensorrt/ would import as a package.
	$(BIN)/pip install -q --upgrade --no-deps --target $(VENV)/tensorrt-stubs tensorrt-stubs==10.13.0.35.1
	touch $@

setup: $(BIN)/qandc

# The main job: the whole Q&C pipeline on the shipped Fashion-MNIST reference DiT, on the CPU: calibrate (the default
# cache plan, a search; TAP, W8A8-INT8, VC) -> ONNX export -> ONNX Runtime engines -> a labelled grid through the
# engines -> eval.
run: setup
	$(BIN)/qandc run --preset w8a8-int8 --selector tap --samples 200 --pool-samples 24 \
		--vc-samples 16 --labels 0,1,2,3,4,5,6,7,8,9 --per-class 4 --seed 0 --out out/run

test: setup
	$(BIN)/python -m pytest

.PHONY: setup run test
