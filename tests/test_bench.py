"""`qandc bench` without a GPU: once every stage is in --state, it only rewrites the JSON and the plot; the headline
ratios come from the stage rows (the measuring itself runs on a GPU, benchmarks/results/bench-*.json)."""

import json

import pytest
import torch

from qandc.bench import CONFIGS, MODELS, PEER_MODELS, bench, pending_stages
from qandc.errors import QandcError
from qandc.sampling.plan import default_plan_shape
from qandc.step_peers import PEER_STAGES


def _rows(state, rates, peer_ms=None):
    """Stage rows as the GPU writes them; peers measured at `peer_ms` (by stage; a peer not named is skipped)."""
    for model in MODELS:
        for i, config in enumerate(CONFIGS):
            row = {"name": config.name, "model": model, "images_per_s": rates.get((model, config.name), 1.0 + i),
                   "ms_full_step": 10.0 + i, "ms_full_step_back_to_back": 9.0 + i, "ms_reuse_step": None,
                   "peak_mem_gb": 1.0, "device_name": "test",
                   "precision": config.precision, "compiled": config.compiled}
            (state / f"{model}--{config.name}.json").write_text(json.dumps(row))
        (state / f"{model}--fp8-floor.json").write_text(json.dumps({"fp8_floor_ms": 4.0}))
    for model in PEER_MODELS:
        for stage in PEER_STAGES:
            ms = (peer_ms or {}).get(stage)
            row = {"name": stage[5:], **({"ms_full_step": ms, "ms_full_step_back_to_back": ms - 0.5} if ms
                                         else {"skipped": "torchao is not installed: pip install 'qandc[peers]'"})}
            (state / f"{model}--{stage}.json").write_text(json.dumps(row))


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
    assert result["full_step_over_fp8_floor_back_to_back"] == pytest.approx((9.0 + CONFIGS.index(qc)) / 4.0)
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


def test_bench_runs_the_stages_in_the_order_asked_skipping_those_done(tmp_path):
    """A user spending a budget names first what must run first: --only's order, peers expanded where named."""
    (tmp_path / "dit-xl-2--peer-compile-bf16.json").write_text(json.dumps({"ms_full_step": 16.0}))
    only = ["peer-diffusers-compile", "fp8-floor", "peers", "fp8-fused-only", "fp8-floor"]
    peers_left = [s for s in PEER_STAGES if s not in ("peer-compile-bf16", "peer-diffusers-compile")]
    assert pending_stages(["dit-xl-2", "reference"], only, tmp_path) == [
        ("dit-xl-2", "peer-diffusers-compile"), ("dit-xl-2", "fp8-floor"), *[("dit-xl-2", s) for s in peers_left],
        ("dit-xl-2", "fp8-fused-only"), ("reference", "fp8-floor"), ("reference", "fp8-fused-only")]


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_bench_compares_the_fastest_engine_full_step_with_the_best_measured_peer(tmp_path):
    from qandc.cli import main

    state, results = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    _rows(state, {}, {"peer-compile-bf16": 16.8, "peer-torchao-fp8-tensor": 16.3, "peer-diffusers-compile": 19.0})
    fastest = min((c for c in CONFIGS if c.compiled and c.precision != "fp32"), key=CONFIGS.index)
    (state / "dit-xl-2--peer-torchao-fp8-tensor.json").unlink()
    args = ["bench", "--card", "h200", "--state", str(state), "--work", str(tmp_path / "work"), "--results",
            str(results)]
    assert main(args + ["--only", "peers"]) == 2  # a peer left to measure needs a GPU
    assert main(args + ["--only", "peer-compile-bf16", "peer-torchao-int8", "fp8-floor"]) == 0
    result = json.loads((results / "bench-h200.json").read_text())
    assert result["best_peer"] == "compile-bf16" and result["fastest_full_step"] == fastest.name
    assert result["full_step_speedup_vs_best_peer"] == pytest.approx(16.8 / (10.0 + CONFIGS.index(fastest)))
    assert result["full_step_speedup_vs_best_peer_back_to_back"] == pytest.approx(
        16.3 / (9.0 + CONFIGS.index(fastest)))
    assert result["fastest_full_step_over_fp8_floor"] == pytest.approx((10.0 + CONFIGS.index(fastest)) / 4.0)
    peers = {r["name"]: r for r in result["peers"]}
    assert peers["torchao-int8"]["skipped"] == "torchao is not installed: pip install 'qandc[peers]'"
    assert "torchao-fp8-tensor" not in peers
    assert (results / "bench-h200.png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_bench_compares_the_fastest_row_with_the_peers_of_its_sitting_only(tmp_path):
    """Rows of two machines (a call lost its machine halfway): the faster peer ran on the other one, so the
    comparison takes the slower peer of the fastest row's own sitting; with no peer there, none is made."""
    state, results = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    _rows(state, {}, {"peer-compile-bf16": 16.8, "peer-torchao-fp8-tensor": 16.3})
    for path in state.glob("*.json"):
        row = json.loads(path.read_text())
        path.write_text(json.dumps({**row, "sitting": "b" if path.name.endswith("torchao-fp8-tensor.json") else "a"}))
    fastest = min((c for c in CONFIGS if c.compiled and c.precision != "fp32"), key=CONFIGS.index)
    result = bench("h200", state, tmp_path / "work", results)
    assert result["sittings"] == 2 and result["best_peer"] == "compile-bf16"
    assert result["full_step_speedup_vs_best_peer"] == pytest.approx(16.8 / (10.0 + CONFIGS.index(fastest)))
    assert result["best_peer_back_to_back"] == "compile-bf16"
    faster = state / "dit-xl-2--peer-compile-bf16.json"  # another peer of the sitting, faster back to back only
    (state / "dit-xl-2--peer-diffusers-compile.json").write_text(json.dumps(
        {**json.loads(faster.read_text()), "name": "diffusers-compile", "ms_full_step": 17.5,
         "ms_full_step_back_to_back": 14.0}))
    result = bench("h200", state, tmp_path / "work", results)
    assert result["best_peer"] == "compile-bf16" and result["best_peer_back_to_back"] == "diffusers-compile"
    assert result["full_step_speedup_vs_best_peer_back_to_back"] == pytest.approx(
        14.0 / (9.0 + CONFIGS.index(fastest)))
    for moved in state.glob("dit-xl-2--peer-*.json"):
        moved.write_text(json.dumps({**json.loads(moved.read_text()), "sitting": "b"}))
    result = bench("h200", state, tmp_path / "work", results)
    assert "full_step_speedup_vs_best_peer" not in result and "best_peer" not in result


def test_load_ready_loads_the_engines_and_runs_every_graph_once(tmp_path):
    from conftest import tiny_model

    from qandc.bench import load_ready
    from qandc.engines import build_inductor
    from qandc.sampling import CachePlan

    build_inductor(tiny_model(), tmp_path / "engines", CachePlan.interval(3))
    pipeline, seconds = load_ready(tmp_path / "engines", compiled=False, rows=4)
    assert seconds > 0 and pipeline.denoiser.calls == {"full": 2, "reuse": 1}  # example_feeds ran the full graph


def test_card_names_for_result_files():
    from qandc.bench import card_name

    names = ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "cpu", "NVIDIA A100-SXM4-40GB"]
    assert [card_name(n) for n in names] == ["h200", "h100", "cpu", "nvidia-a100-sxm4-40gb"]
