"""benchmarks/front.py keeps each point's searched plan in its state; a plan kept from another candidate family
(`plan_search.FAMILY`) is searched again in the screen phase only (the others report what the state holds)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import front  # noqa: E402
from qandc.calibration.plan_search import FAMILY  # noqa: E402


def test_a_plan_of_another_family_is_searched_again_when_screening_only(tmp_path):
    state = front.Front(tmp_path / "state", tmp_path / "work", torch.device("cpu"), search_samples=1,
                        calibration={}, steps=8)
    point = front.Point("ddim", "searched+forecast", 0.4, 1, "bf16")
    searched = state.plan(point)
    assert searched != front.CachePlan.interval(3, forecast=1)  # so that the stale plan below differs
    kept = json.loads(state.plan_path(point).read_text())
    assert kept["search"]["family"] == FAMILY
    stale = {**kept, "plan": front.CachePlan.interval(3, forecast=1).to_dict(),
             "search": {**kept["search"], "family": "an older family"}}
    state.plan_path(point).write_text(json.dumps(stale))
    assert state.plan(point) == front.CachePlan.interval(3, forecast=1)  # reported as kept
    assert state.plan(point, search_stale=True) == searched  # the same search again, on the same trajectories
    assert json.loads(state.plan_path(point).read_text())["search"]["family"] == FAMILY
