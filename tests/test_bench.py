"""`qandc bench` without a GPU: once every stage is in --state, it only rewrites the JSON and the plot; the headline
ratios come from the stage rows (the measuring itself runs on a GPU, benchmarks/results/bench-*.json)."""

import json

import pytest
import torch

from qandc.bench import CONFIGS, MODELS, bench
from qandc.errors import QandcError


def _rows(state, rates):
    for model in MODELS:
        for i, config in enumerate(CONFIGS):
            row = {"name": config.name, "model": model, "images_per_s": rates.get((model, config.name), 1.0 + i),
                   "ms_full_step": 10.0 + i, "ms_reuse_step": None, "peak_mem_gb": 1.0, "device_name": "test"}
            (state / f"{model}--{config.name}.json").write_text(json.dumps(row))
        (state / f"{model}--fp8-floor.json").write_text(json.dumps({"fp8_floor_ms": 4.0}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_bench_summarizes_finished_stages_without_a_gpu(tmp_path):
    state, results = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    with pytest.raises(QandcError, match="needs a CUDA GPU"):
        bench("h200", state, tmp_path / "work", results)
    _rows(state, {("dit-xl-2", "qc-fp8-cache"): 60.0, ("dit-xl-2", "qc-int8-cache"): 50.0,
                  ("dit-xl-2", "bf16-compiled-50"): 20.0, ("dit-xl-2", "fp32-eager-ddpm250"): 0.5})
    result = bench("h200", state, tmp_path / "work", results)
    assert result["best_qc"] == "qc-fp8-cache"
    assert result["speedup_vs_bf16_compiled"] == pytest.approx(3.0)
    assert result["speedup_vs_fp32_ddpm250"] == pytest.approx(120.0)
    qc = next(c for c in CONFIGS if c.name == "qc-fp8-cache")
    assert result["full_step_over_fp8_floor"] == pytest.approx((10.0 + CONFIGS.index(qc)) / 4.0)
    assert len(result["configs"]) == len(MODELS) * len(CONFIGS)
    assert json.loads((results / "bench-h200.json").read_text()) == result
    assert (results / "bench-h200.png").stat().st_size > 10_000
