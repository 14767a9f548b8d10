"""Plan search (`auto...`) on a tiny random model: the grammar, the err / reuse targets, and the compute search's
guarantees (compute fraction within the target, at most 4 reuse sets, no worse than the interval plan at the same
fraction on held-out seeds, error not growing with the target, no cache at a fraction of 1)."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.calibration.plan_search import (Changes, PlanSearch, auto_plan, candidate_plans, check_search, choose,
                                           evaluate_candidates, parse_auto, reuse_errors, sample_error, search_plan)
from qandc.errors import QandcError
from qandc.model.dit import branch_flops
from qandc.sampling import CachePlan, sample
from qandc.sampling.plan import MAX_REUSE_SETS

STEPS = 12
TARGETS = (0.26, 0.34, 0.5, 0.75)  # interval 4, 3, 2 compute 3/12, 4/12, 6/12 of the uncached run
INTERVAL_AT = {0.26: 4, 0.34: 3, 0.5: 2}
HELD_OUT = dict(labels=torch.arange(6) % 10 + 3, seed=7)  # other labels and noise than the search's (seed 0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(guidance="all")


def held_out_errors(model, plans, sampler):
    """The error of each plan on held-out labels and noise."""
    labels, seed = HELD_OUT["labels"], HELD_OUT["seed"]
    reference = sample(model, labels, STEPS, sampler, 1.5, seed=seed)
    return [sample_error(model, plan, labels, STEPS, sampler, 1.5, seed, reference) for plan in plans]


def test_grammar_round_trip_and_bad_specs():
    assert parse_auto("auto") == PlanSearch("err", 0.1)
    assert parse_auto("auto,forecast=1") == PlanSearch("err", 0.1, 1)
    assert parse_auto("auto:compute=0.34,forecast=2,factors=bf16") == PlanSearch("compute", 0.34, 2, "bf16")
    for search in (PlanSearch("err", 0.05), PlanSearch("reuse", 0.5, 1), PlanSearch("compute", 1 / 3, 2, "bf16"),
                   PlanSearch("compute", 1.0)):
        assert parse_auto(search.spec) == search
    assert PlanSearch("compute", 0.5, 1).spec == "auto:compute=0.5,forecast=1"
    for bad in ("auto:", "auto:err=0", "auto:reuse=2", "auto:fast=1", "autox", "auto:compute=1.5", "auto:compute=0",
                "auto:compute=nan", "auto:err=inf", "auto:compute=0.5,forecast=3", "auto:compute=0.5,factors=fp16",
                "auto:compute=0.5,forecast=1,forecast=2", "auto:compute=0.5,regate=1", "auto:compute=0.5,"):
        with pytest.raises(QandcError) as error:
            parse_auto(bad)
        assert "\n" not in str(error.value) and bad in str(error.value)


def test_err_and_reuse_targets(model):
    errors = reuse_errors(model, torch.arange(3), STEPS, "ddpm", 1.5, 0)
    assert sorted(errors) == sorted(model.branch_names) and errors["blocks.0.attn"].shape == (STEPS, STEPS)
    reuse = [1 - np.mean(search_plan(errors, PlanSearch("err", e))[0].full_steps(STEPS)) for e in (0.05, 0.3, 1, 5)]
    assert reuse == sorted(reuse) and reuse[-1] > reuse[0]  # a larger error budget reuses more
    for fraction in (0.25, 0.5, 0.9):
        plan, summary = search_plan(errors, PlanSearch("reuse", fraction, 2, "bf16"))
        assert summary["reuse_fraction"] >= fraction and plan.branches == "all"
        assert (plan.forecast, plan.factors) == (2, "bf16")
    tight, _ = search_plan(errors, PlanSearch("err", 1e-6))
    assert len(tight.branches) == 1  # at least the best branch


def test_a_target_below_the_cheapest_candidate_is_refused(model):
    check_search(PlanSearch("compute", 0.17), 12, model.config)  # interval 8 computes 2 of 12 steps
    with pytest.raises(QandcError, match="interval 8.*0.167"):
        check_search(PlanSearch("compute", 0.16), 12, model.config)


def test_the_choice_is_the_least_error_within_the_target_and_never_gets_worse():
    rng = np.random.default_rng(0)
    for _ in range(200):
        fractions = [0.2, *rng.choice([0.2, 0.3, 0.5, 0.7], 11)]  # the first one an interval plan
        candidates = sorted(({"name": str(i), "compute_fraction": float(f), "error": float(rng.uniform()),
                              "interval": bool(i == 0 or rng.integers(2))} for i, f in enumerate(fractions)),
                            key=lambda c: (c["compute_fraction"], not c["interval"]))
        assert choose(candidates, 0.1) is None
        errors = []
        for target in (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7):
            chosen = choose(candidates, target)
            within = [c for c in candidates if c["compute_fraction"] <= target]
            assert chosen in within and chosen["error"] == min(c["error"] for c in within)
            errors.append(chosen["error"])
        assert errors == sorted(errors, reverse=True)
    tie = [{"name": n, "compute_fraction": f, "error": 0.5, "interval": False} for n, f in (("a", 0.2), ("b", 0.3))]
    assert choose(tie, 0.5)["name"] == "a"  # the cheaper one at a tie


def test_compute_fraction_one_is_no_cache(model):
    plan, summary = auto_plan(model, parse_auto("auto:compute=1"), STEPS, "ddpm", 1.5, 0, samples=2)
    assert plan == CachePlan.none() and summary["chosen"] == "none"
    labels = torch.arange(3)
    assert torch.equal(sample(model, labels, STEPS, "ddpm", 1.5, seed=4, plan=plan),
                       sample(model, labels, STEPS, "ddpm", 1.5, seed=4))
    evaluated, plans = evaluate_candidates(model, 1.0, 0, "float32", labels, STEPS, "ddim", 1.5, 4)
    assert evaluated[-1]["name"] == "none" and evaluated[-1]["error"] == 0.0  # the recorded run is the uncached one
    assert all(c["error"] > 0 for c in evaluated[:-1])
    assert all(len(p.graph_names) <= MAX_REUSE_SETS for p in plans.values())


@pytest.mark.parametrize("sampler, forecast", [("ddpm", 0), ("ddim", 1), ("ddpm", 2)])
def test_compute_search_guarantees(model, sampler, forecast):
    flops = branch_flops(model.config)
    searched, plans = [], []
    for target in TARGETS:
        plan, summary = auto_plan(model, PlanSearch("compute", target, forecast), STEPS, sampler, 1.5, 0, samples=3)
        fraction = plan.compute_fraction(STEPS, flops)
        assert fraction <= target and fraction == summary["compute_fraction"]
        assert len(plan.graph_names) <= MAX_REUSE_SETS and plan.forecast == forecast
        candidates = summary["candidates"]
        assert all(c["compute_fraction"] <= target for c in candidates)
        assert summary["error"] == min(c["error"] for c in candidates)
        searched.append(summary["error"])
        plans.append(plan)
    assert searched == sorted(searched, reverse=True)
    assert any(plan.schedule for plan in plans)  # the structured schedules are in play, not the interval plans alone
    # held-out trajectories: no worse than the interval plan at the same fraction, and no worse as the target grows
    intervals = [CachePlan.interval(INTERVAL_AT[t], forecast=forecast) for t in TARGETS if t in INTERVAL_AT]
    assert all(p.compute_fraction(STEPS, flops) <= t for p, t in zip(intervals, TARGETS))
    held_out = held_out_errors(model, plans + intervals, sampler)
    assert all(a <= b for a, b in zip(held_out, held_out[len(TARGETS):]))
    assert held_out[:len(TARGETS)] == sorted(held_out[:len(TARGETS)], reverse=True)


def test_the_family_holds_evenly_spaced_schedules(model):
    """Beside the change-placed ones, whatever the changes measured: a forecast extrapolates over the gaps between
    full steps (stride 2's 25 even steps are interval 2, listed once)."""
    flops = branch_flops(model.config)
    changes = Changes(np.random.default_rng(0).random(50) ** 4 + 0.01, dict.fromkeys(flops, 1.0))
    family = {c.name: c.plan for c in candidate_plans(changes, flops, forecast=1)}
    for count in (20, 17, 15, 13):  # strides 2.5, 3, 3.5, 4 at 50 steps
        full = [s for s, graph in enumerate(family[f"placed{count}-power0"].step_graphs(50)) if graph == "full"]
        gaps = np.diff(full + [50])
        assert len(full) == count and gaps.max() - gaps.min() <= 1
    assert "placed25-power0" not in family and "interval2" in family
