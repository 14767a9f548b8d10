"""Cache-plan search: a training-free stand-in for Learning-to-Cache's router.

On full-precision, uncached trajectories, every branch output is recorded at every step. Reusing branch b at step s
from the last full step f costs e(f, s, b) = ||o_b(s) − o_b(f)|| / ||o_b(s)|| (gated outputs, summed over the batch).
A plan is built from these measured errors:
- `err=E` (error budget): the reuse set is every branch whose mean adjacent-step error is at most E (at least the
  best one); walking the steps, a step reuses the cache while the reuse set's mean error from the last full step
  stays within E, and runs full otherwise.
- `reuse=F` (reuse fraction): the reuse set is every branch, and the budget is the smallest E (bisection) whose
  walk reuses at least a fraction F of the steps.
CLI grammar: `auto`, `auto:err=E` or `auto:reuse=F` (`auto` is `auto:err=0.1`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..errors import QandcError
from ..sampling import CachePlan, SamplingRun

DEFAULT_BUDGET = 0.1


class PlanSearch(NamedTuple):
    """A plan to search instead of a given one: an error budget ("err", E) or a reuse fraction ("reuse", F)."""

    kind: str
    value: float

    @property
    def spec(self) -> str:
        return f"auto:{self.kind}={self.value:g}"


def parse_auto(spec: str) -> PlanSearch:
    """The PlanSearch of `auto[:err=E|:reuse=F]`."""
    if spec == "auto":
        return PlanSearch("err", DEFAULT_BUDGET)
    key, _, value = spec.removeprefix("auto:").partition("=")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if not spec.startswith("auto:") or key not in ("err", "reuse") or not 0 < target <= (1 if key == "reuse" else 1e9):
        raise QandcError(f"cache spec {spec!r}: expected auto, auto:err=E (E > 0) or auto:reuse=F (0 < F <= 1)")
    return PlanSearch(key, target)


class _Recorder:
    """A denoiser that runs the full path at every step and keeps every branch's conditional-row outputs."""

    def __init__(self, model, rows: int):
        self.model, self.config, self.branch_names = model, model.config, model.branch_names
        self.rows, self.outputs = rows, []

    @property
    def device(self):
        return self.model.device

    def forward_full(self, x, t, y, branches=None, regate=False):
        out, cache = self.model.forward_full(x, t, y, branches=self.branch_names, regate=False)
        self.outputs.append({k: v[:self.rows].half().cpu() for k, v in cache.items()})
        return out, {}


def reuse_errors(model, labels, steps: int, sampler: str, cfg_scale: float, seed: int) -> dict[str, np.ndarray]:
    """Per branch, E[f, s] = relative error of reusing step f's gated output at step s (f < s), measured on
    uncached full-precision trajectories of `labels`."""
    recorder = _Recorder(model, len(labels))
    run = SamplingRun(recorder, labels, steps, sampler, cfg_scale, seed=seed)
    for _ in range(steps):
        run.step()
    errors = {}
    for b in model.branch_names:
        series = torch.stack([o[b] for o in recorder.outputs]).float()  # (steps, N, T, D)
        matrix = np.zeros((steps, steps))
        for s in range(1, steps):
            diff = (series[:s] - series[s]).flatten(1).norm(dim=1) / series[s].norm().clamp(min=1e-12)
            matrix[:s, s] = diff.numpy()
        errors[b] = matrix
    return errors


def _walk(errors: dict, branches: list[str], budget: float) -> list[bool]:
    """Full (True) or reuse per step: reuse while the reuse set's mean error from the last full step fits."""
    mean = np.mean([errors[b] for b in branches], axis=0)
    full, last = [True], 0
    for s in range(1, len(mean)):
        reuse = mean[last, s] <= budget
        full.append(not reuse)
        last = last if reuse else s
    return full


def search_plan(errors: dict[str, np.ndarray], target: PlanSearch, regate: bool = False):
    """(plan meeting `target`, summary of the measured errors) from `reuse_errors`."""
    names = list(errors)
    steps = len(next(iter(errors.values())))
    adjacent = {b: float(np.mean([m[s - 1, s] for s in range(1, steps)])) if steps > 1 else 0.0
                for b, m in errors.items()}
    kind, value = target
    if kind == "err":
        branches = [b for b in names if adjacent[b] <= value] or [min(names, key=adjacent.get)]
        budget = value
    else:
        branches, lo, hi = names, 0.0, 10.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if 1 - np.mean(_walk(errors, branches, mid)) >= value else (mid, hi)
        budget = hi
    schedule = _walk(errors, branches, budget)
    plan = CachePlan.from_steps(schedule, branches="all" if len(branches) == len(names) else branches, regate=regate)
    summary = {"target": {kind: value}, "budget": budget, "reuse_fraction": 1 - float(np.mean(schedule)),
               "branch_adjacent_error": adjacent}
    return plan, summary


def auto_plan(model, search: PlanSearch, steps: int, sampler: str, cfg_scale: float, seed: int, samples: int = 4):
    """Search a plan for `search` on `samples` trajectories (labels i % classes). Memory: every branch output
    of every step is kept in float16 for those samples (about 0.3 GB for the reference model at 4 samples)."""
    labels = torch.arange(samples) % model.config.num_classes
    return search_plan(reuse_errors(model, labels, steps, sampler, cfg_scale, seed), search)
