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
	touch $@

setup: $(BIN)/qandc

# The main job: a labelled grid from the shipped Fashion-MNIST reference DiT (DDPM-50, CFG 1.5), on the CPU.
run: setup
	$(BIN)/qandc generate --labels 0,1,2,3,4,5,6,7,8,9 --per-class 4 --steps 50 --sampler ddpm --cfg-scale 1.5 \
		--seed 0 --out out/generate

test: setup
	$(BIN)/python -m pytest

.PHONY: setup run test
