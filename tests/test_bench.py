"""`qandc bench` without a GPU: once every stage is in --state, it only rewrites the JSON and the plot; the headline
ratios come from the stage rows (the measuring itself runs on a GPU, benchmarks/results/bench-*.json)."""

import json

import pytest
import torch

from qandc.bench import CONFIGS, MODELS, bench
from qandc.errors import QandcError
from qandc.sampling.plan import default_plan_shape


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_bench_only_runs_the_stages_named_and_best_qc_weighs_the_default_plan(tmp_path):
    from qandc.cli import main

    state, results = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    _rows(state, {("dit-xl-2", "qc-fp8-cache"): 60.0, ("dit-xl-2", "qc-int8-default"): 80.0,
                  ("dit-xl-2", "bf16-compiled-50"): 20.0})
    (state / "reference--cache-default.json").unlink()
    args = ["bench", "--card", "h200", "--state", str(state), "--work", str(tmp_path / "work"), "--results",
            str(results)]
    assert main(args) == 2  # a stage left to measure needs a GPU
    assert main(args + ["--only", "bf16-compiled-50", "qc-int8-default", "fp8-floor"]) == 0  # those are done
    result = json.loads((results / "bench-h200.json").read_text())
    assert result["best_qc"] == "qc-int8-default" and result["speedup_vs_bf16_compiled"] == pytest.approx(4.0)
    assert ("reference", "cache-default") not in {(r["model"], r["name"]) for r in result["configs"]}
    with pytest.raises(QandcError, match="unknown bench stage 'qc-fp16'"):
        bench("h200", state, tmp_path / "work", results, only=["qc-fp16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_bench_quality_comes_from_the_ablation_row_of_the_same_plan(tmp_path):
    state, results = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    results.mkdir()
    _rows(state, {})
    quality = {"class_accuracy": 0.9, "n": 100}
    rows = [{"name": "tap+vc", "preset": "w8a8-fp8", "cache": "auto:compute=0.5",  # a searched plan, as recorded
             "plan": default_plan_shape(50).to_dict(), "fd": 3.0, **quality},
            {"name": "tap+vc", "preset": "w8a8-fp8", "cache": "interval=3", "fd": 7.5, **quality},  # the first form
            {"name": "tap+vc", "preset": "w8a8-int8", "cache": "interval=5", "fd": 9.0, **quality}]
    (results / "ablation.json").write_text(json.dumps({"rows": rows}))
    configs = {r["name"]: r for r in bench("h200", state, tmp_path / "work", results)["configs"]
               if r["model"] == "reference"}
    assert configs["qc-fp8-default"]["fd"] == 3.0 and configs["qc-fp8-cache"]["fd"] == 7.5
    assert "fd" not in configs["qc-int8-cache"] and "fd" not in configs["qc-int8-default"]  # no row of their plan
