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

run: setup
	$(BIN)/qandc init --config DiT-S/4 --input-size 32 --in-channels 3 --num-classes 10 --nonzero --out out/random-dit.pt
	$(BIN)/qandc generate --checkpoint out/random-dit.pt --labels 0,1,2,3,4,5,6,7 --steps 50 --sampler ddpm \
		--cfg-scale 1.5 --cache interval=3 --seed 0 --out out/generate

test: setup
	$(BIN)/python -m pytest

.PHONY: setup run test
