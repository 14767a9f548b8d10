"""Calibration under forecasting, multi-set plans: replayed entries are exactly the sampler's graph calls, VC and
the recipe follow the forecasting trajectory, and order 0 feeds calibration what the plain paths always did."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.model.forecast import TAYLOR
from qandc.model.graphs import engine_graphs
from qandc.sampling import CachePlan, sample

pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import CalibrationSettings, SelectorParams, apply_recipe, calibrate, collect_pool  # noqa: E402
from qandc.calibration import fit_vc, replay  # noqa: E402
from qandc.calibration.pool import run_entries  # noqa: E402
from qandc.calibration.sensitivity import REPORT  # noqa: E402
from qandc.formats.recipe import load_vc  # noqa: E402

STEPS = 9
SETS = {"reuse": ("blocks.0.attn", "blocks.1.mlp"), "reuse1": ("blocks.0.mlp",),
        "reuse2": ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")}
SCHEDULE = ["full", "reuse", "reuse1", "reuse2", "full", "reuse2", "reuse", "full", "reuse1"]
PLAN = CachePlan.from_steps(SCHEDULE, branches=SETS["reuse"], reuse_sets=(SETS["reuse1"], SETS["reuse2"]),
                            forecast=2)


class GraphCalls:
    """A denoiser wrapper keeping every graph call's feeds and outputs, in call (= step) order."""

    def __init__(self, model):
        self.model, self.config, self.branch_names, self.device = model, model.config, model.branch_names, model.device
        self.calls = []

    def forward_graph(self, spec, feeds):
        outputs = self.model.forward_graph(spec, feeds)
        self.calls.append((spec.name, feeds, outputs))
        return outputs


@pytest.fixture(scope="module")
def model():
    return tiny_model(guidance="all")


def _pool_and_entries(model, plan, tmp_path, selected):
    pool = collect_pool(model, 5, STEPS, "ddpm", 1.5, plan, seed=3, batch_size=2, shards=tmp_path)
    return pool, replay(model, pool, selected, batch_size=3)


@torch.no_grad()
def test_replayed_entries_are_the_samplers_graph_calls(model, tmp_path):
    calls = GraphCalls(model)
    sample(calls, torch.arange(5) % 10, STEPS, cfg_scale=1.5, seed=3, plan=PLAN)  # all five in one batch
    selected = np.arange(0, 45, 2)  # every graph, in other batches than the sampler's
    pool, entries = _pool_and_entries(model, PLAN, tmp_path, selected)
    assert {e.graph for e in entries} == {"full", *SETS}
    graphs = engine_graphs(PLAN, model.branch_names)
    compared = 0
    for index, outputs in run_entries(model, entries, graphs, batch_size=2):
        for i, output in zip(index, outputs):
            k, entry = selected[i], entries[i]
            name, feeds, reference = calls.calls[pool.step[k]]
            rows = [pool.sample[k], pool.sample[k] + 5]
            assert entry.graph == name and sorted(entry.feeds) == sorted(feeds)
            assert torch.equal(entry.feeds[TAYLOR], feeds[TAYLOR][rows])  # the host's step arithmetic, exactly
            assert sorted(output) == sorted(reference) == sorted(graphs[name].output_names)
            for tensor, value in output.items():  # equal up to float32 batching noise (CPU matmul by batch)
                scale = reference[tensor].abs().max()
                assert torch.allclose(value, reference[tensor][rows], rtol=0, atol=1e-5 * scale), (k, tensor)
            compared += 1
    assert compared == len(selected)
    late = entries[list(pool.step[selected]).index(8)]  # reuses blocks.0.mlp, computed at steps 7, 6 and 4
    assert late.graph == "reuse1" and late.feeds[TAYLOR][:, 0].tolist() == [[1.0, 2.0]] * 2  # (8-7), (8-7)(8-6)


@torch.no_grad()
def test_order_zero_entries_feed_the_plain_paths(model, tmp_path):
    plan = dataclasses.replace(PLAN, forecast=0)
    selected = np.arange(1, 45, 2)  # every step of some sample
    _, entries = _pool_and_entries(model, plan, tmp_path, selected)
    graphs = engine_graphs(plan, model.branch_names)
    emitted = plan.cached_branches(model.branch_names)
    checked = set()
    for index, outputs in run_entries(model, entries, graphs, batch_size=1):  # the batches the plain calls see
        for i, output in zip(index, outputs):
            entry = entries[i]
            x, t, y = (entry.feeds[k] for k in ("x", "t", "y"))
            assert TAYLOR not in entry.feeds
            if entry.graph == "full":
                assert sorted(entry.feeds) == ["t", "x", "y"]
                out, cache = model.forward_full(x, t, y, branches=emitted)
                assert all(torch.equal(output[b], cache[b]) for b in emitted)
            else:
                cache = {b: entry.feeds[b] for b in SETS[entry.graph]}
                assert sorted(entry.feeds) == sorted(["x", "t", "y", *cache])
                out = model.forward_reuse(x, t, y, cache)
            assert torch.equal(output["out"], out)
            checked.add(entry.graph)
    assert checked == {"full", *SETS}


def _settings(plan, **overrides):
    base = dict(preset="w8a8-int8", selector="uniform", budget=24, plan=plan, pool_samples=6, steps=STEPS,
                selector_params=SelectorParams(timesteps=STEPS), vc="var", vc_samples=6, batch_size=4)
    return CalibrationSettings(**{**base, **overrides})


def test_calibrate_with_a_forecast_plan(model, tmp_path):
    recipe = calibrate(model, tmp_path, _settings(PLAN), report=True)
    assert recipe.cache_plan == PLAN
    report = json.loads((tmp_path / REPORT).read_text())
    assert {row["kind"] for row in report["per_step"]} == set(SCHEDULE)
    assert all(row["kind"] == SCHEDULE[row["step"]] for row in report["per_step"])
    q, _ = apply_recipe(copy.deepcopy(model), tmp_path)
    K, calls = load_vc(tmp_path), GraphCalls(q)
    assert torch.equal(K, fit_vc(model, calls, torch.arange(6) % 10, STEPS, "ddpm", 1.5, 1, PLAN, "var"))
    assert [name for name, _, _ in calls.calls] == SCHEDULE  # the quantized run forecasts from step 2 on
    forecasting = [bool(feeds[TAYLOR][:, :len(SETS.get(name, ()))].any()) for name, feeds, _ in calls.calls]
    assert forecasting == [name != "full" and step >= 2 for step, name in enumerate(SCHEDULE)]
    plain = fit_vc(model, q, torch.arange(6) % 10, STEPS, "ddpm", 1.5, 1, dataclasses.replace(PLAN, forecast=0))
    assert torch.equal(K[:2], plain[:2]) and not torch.equal(K[2:], plain[2:])  # the same until it forecasts
    samples = sample(q, [1, 2], STEPS, cfg_scale=1.5, seed=4, plan=PLAN)
    assert torch.isfinite(samples).all()
