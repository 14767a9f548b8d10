"""Cache-plan search: a training-free stand-in for Learning-to-Cache's router.

One grammar: `auto[:err=E|:reuse=F|:compute=F][,forecast=K][,factors=float32|bf16]` (`auto` is `auto:err=0.1`).
Every kind records uncached, full-precision trajectories of the calibration's sampler, steps and guidance; the plan
it returns reuses (forecast=0) or forecasts (K = 1, 2, in `factors` precision) as asked.

`err=E` and `reuse=F` place full steps by measured reuse error. Reusing branch b at step s from the last full step
f costs e(f, s, b) = ||o_b(s) − o_b(f)|| / ||o_b(s)|| (gated outputs of the conditional rows).
- `err=E` (error budget): the reuse set is every branch whose mean adjacent-step error is at most E (at least the
  best one); walking the steps, a step reuses the cache while the reuse set's mean error from the last full step
  stays within E, and runs full otherwise.
- `reuse=F` (a fraction of steps): the reuse set is every branch, and the budget is the smallest E (bisection) whose
  walk reuses at least a fraction F of the steps. Its compute fraction is therefore at most 1 − F, but nothing
  compares it with other plans; `compute=1−F` is the search that aims at quality for that cost.
Both measure plain reuse error; with a forecast they place the same full steps (the forecast then usually lowers
the error below the budget, though nothing checks it).

`compute=F` (a compute fraction, `CachePlan.compute_fraction` with `branch_flops`: attention and MLP branches weigh
differently) returns the plan of least measured output error among a fixed family of candidates whose compute
fraction is at most F. The family does not depend on F:
- the interval plans N = 1 .. 8 (all branches; N = 1 is no cache);
- for the full-step count M = ⌈steps / N⌉ of each stride N in STRIDES (the intervals 2 .. 8 and the half strides 2.5
  and 3.5, whose counts fall between the intervals': 0.4 and 0.3 of the steps at 50): M full steps placed at
  quantiles of the measured change of the branch outputs along the uncached trajectories (cumulative
  Σ_b ||o_b(s) − o_b(s−1)||, raised to the powers PLACEMENT_POWERS; power 0 is even spacing: a forecast
  extrapolates over the gaps, and under DDIM on the reference model even schedules held 2-4x less error than
  change-placed ones at the same compute), and a two-tier schedule: the branches of most change per FLOP,
  about TIER_SHARE of the FLOPs, are refreshed TIER_RATIO times as often as the rest, at evenly spaced steps (graphs
  full, reuse1 = the rest reused, reuse = all reused: two reuse sets, of the 4 a plan may have).
The error of a candidate is measured by sampling it: the geometric mean over the search trajectories (the
calibration's seed, `samples` labels i % classes) of each final sample's Σ (x − x₀)² / Σ x₀² against the uncached
one x₀, the noise shared; −10 log10 of it is their mean SNR (PSNR up to the peak) in dB. A geometric mean, since
under DDPM a plan can send an odd sample to another image altogether, and one such sample would otherwise outweigh
the fidelity of all the others. Candidates are walked in order of compute fraction; one
becomes the answer when its error is below the answer's so far: the least error within F, the cheaper candidate at
a tie. (A bar for structured candidates — cut the best interval plan's error 3 times, set on held-out L2 of 8 search
trajectories — was dropped: at the 10 searches on the reference model where it chose otherwise, under DDPM and
DDIM, the least-error candidate screened at a lower FD at 9 and the same at one, e.g. DDPM at 0.5: 0.92-0.94x of the
uncached FD against 1.27-1.47x; benchmarks/results/plan-search-choice-h200.json.) Hence, on the search
trajectories: the answer's error is at most every interval plan's within F, and does not grow as F grows (the family
and its errors do not depend on F; only candidates within F are sampled). F ≥ 1 gives no cache without measuring;
F below the interval-8 plan's fraction is refused. Cost: one uncached run of the search trajectories, then each
candidate within F at its own compute (on the reference model under DDPM: 30 candidates, about 7 uncached runs'
worth, at F = 0.43; 27 and 6 at F = 0.36).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..errors import QandcError
from ..model.dit import branch_flops
from ..model.graphs import GraphSpec
from ..sampling import CachePlan, sample
from ..sampling.plan import AUTO_GRAMMAR, FACTOR_DTYPES, FORECAST_ORDERS

DEFAULT_BUDGET = 0.1
KINDS = ("err", "reuse", "compute")
MAX_INTERVAL = 8          # the interval plans of the compute family: N = 1 .. MAX_INTERVAL
STRIDES = (2, 2.5, 3, 3.5, 4, 5, 6, 7, 8)  # full-step counts ⌈steps / N⌉ of the structured candidates
PLACEMENT_POWERS = (0.0, 0.5, 1.0)  # 0: evenly spaced
TIER_SHARE = 0.5          # the FLOP share of the tier refreshed more often
TIER_RATIO = 1.5          # its refreshes per full step of the interval plan at the same compute
# what a compute search's answer depends on besides the model: recorded with it, so that a stored answer of another
# family is searched again
FAMILY = (f"intervals 1-{MAX_INTERVAL}; strides {','.join(f'{s:g}' for s in STRIDES)}; placement powers "
          f"{','.join(f'{p:g}' for p in PLACEMENT_POWERS)}; tiers {TIER_SHARE:g} of the FLOPs, {TIER_RATIO:g}x")


class PlanSearch(NamedTuple):
    """A plan to search instead of a given one: an error budget ("err", E), a reuse fraction ("reuse", F) or a compute
    fraction ("compute", F); the plan forecasts with `forecast` and `factors` as a CachePlan does."""

    kind: str
    value: float
    forecast: int = 0
    factors: str = "float32"

    @property
    def spec(self) -> str:
        """The CLI text (parse_auto(search.spec) == search)."""
        value = f"{self.value:g}" if float(f"{self.value:g}") == self.value else repr(self.value)
        options = f",forecast={self.forecast}" if self.forecast else ""
        options += f",factors={self.factors}" if self.factors != "float32" else ""
        return f"auto:{self.kind}={value}{options}"


def parse_auto(spec: str) -> PlanSearch:
    """The PlanSearch of `auto[:err=E|:reuse=F|:compute=F][,forecast=K][,factors=float32|bf16]`."""
    head, *options = spec.strip().split(",")
    kind, value = "err", DEFAULT_BUDGET
    if head != "auto":
        kind, sep, text = head.removeprefix("auto:").partition("=")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        top = math.inf if kind == "err" else 1.0
        if not head.startswith("auto:") or not sep or kind not in KINDS or not 0 < value <= top \
                or not math.isfinite(value):
            raise QandcError(f"cache spec {spec!r}: expected {AUTO_GRAMMAR}")
    fields = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or key not in ("forecast", "factors") or key in fields:
            raise QandcError(f"cache spec {spec!r}: expected {AUTO_GRAMMAR}")
        fields[key] = text
    forecast = fields.get("forecast", "0")
    if forecast not in [str(k) for k in FORECAST_ORDERS]:
        raise QandcError(f"cache spec {spec!r}: forecast must be 0, 1 or 2")
    factors = fields.get("factors", "float32")
    if factors not in FACTOR_DTYPES:
        raise QandcError(f"cache spec {spec!r}: factors must be float32 or bf16")
    return PlanSearch(kind, value, int(forecast), factors)


def check_search(search: PlanSearch, steps: int, config) -> None:
    """Refuse a search that has no answer at `steps` for a model of `config`, before any work."""
    if search.kind != "compute" or search.value >= 1:
        return
    floor = CachePlan.interval(MAX_INTERVAL).compute_fraction(steps, branch_flops(config))
    if search.value < floor:
        raise QandcError(f"cache spec {search.spec!r}: the search's cheapest plan (interval {MAX_INTERVAL}) computes "
                         f"{floor:.3g} of the uncached run at {steps} steps; ask for at least that")


class _Recorder:
    """A denoiser that runs the uncached model, every branch emitted, and hands each step's branch outputs (the
    first `rows` rows) to `keep`."""

    def __init__(self, model, rows: int | None, keep):
        self.model, self.config, self.branch_names = model, model.config, model.branch_names
        self.rows, self.keep = rows, keep
        self.graph = GraphSpec("full", (), tuple(model.branch_names))

    @property
    def device(self):
        return self.model.device

    def forward_graph(self, spec, feeds):
        outputs = self.model.forward_graph(self.graph, feeds)
        self.keep({b: outputs[b][:self.rows] for b in self.branch_names})
        return {"out": outputs["out"]}


def _record(model, labels, steps: int, sampler: str, cfg_scale: float, seed: int, rows, keep) -> torch.Tensor:
    """Sample `labels` uncached, handing every step's branch outputs to `keep`; return the final samples."""
    return sample(_Recorder(model, rows, keep), labels, steps, sampler, cfg_scale, seed=seed)


def reuse_errors(model, labels, steps: int, sampler: str, cfg_scale: float, seed: int) -> dict[str, np.ndarray]:
    """Per branch, E[f, s] = relative error of reusing step f's gated output at step s (f < s), measured on
    uncached full-precision trajectories of `labels`."""
    outputs = []
    _record(model, labels, steps, sampler, cfg_scale, seed, len(labels),
            lambda step: outputs.append({b: v.half().cpu() for b, v in step.items()}))
    errors = {}
    for b in model.branch_names:
        series = torch.stack([o[b] for o in outputs]).float()  # (steps, N, T, D)
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
    """(plan meeting an `err` or `reuse` target, summary of the measured errors) from `reuse_errors`."""
    names = list(errors)
    steps = len(next(iter(errors.values())))
    adjacent = {b: float(np.mean([m[s - 1, s] for s in range(1, steps)])) if steps > 1 else 0.0
                for b, m in errors.items()}
    if target.kind == "err":
        branches = [b for b in names if adjacent[b] <= target.value] or [min(names, key=adjacent.get)]
        budget = target.value
    elif target.kind == "reuse":
        branches, lo, hi = names, 0.0, 10.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if 1 - np.mean(_walk(errors, branches, mid)) >= target.value else (mid, hi)
        budget = hi
    else:
        raise QandcError(f"{target.spec}: a compute target is searched by sampling candidates (auto_plan)")
    schedule = _walk(errors, branches, budget)
    plan = CachePlan.from_steps(schedule, branches="all" if len(branches) == len(names) else branches, regate=regate,
                                forecast=target.forecast, factors=target.factors)
    summary = {"target": {target.kind: target.value}, "budget": budget,
               "reuse_fraction": 1 - float(np.mean(schedule)), "branch_adjacent_error": adjacent}
    return plan, summary


# --- compute=F: a fixed candidate family, each candidate measured by sampling it ---

class Changes(NamedTuple):
    """What the compute family is built from, measured on the uncached search trajectories: per step s, the summed
    change Σ_b ||o_b(s) − o_b(s−1)|| (step 0 takes step 1's); per branch, its change summed over the steps."""

    step: np.ndarray
    branch: dict[str, float]


def _measure(model, labels, steps: int, sampler: str, cfg_scale: float, seed: int) -> tuple[Changes, torch.Tensor]:
    """(the changes of the branch outputs along uncached trajectories of `labels`, their final samples)."""
    previous, step_change, branch_change = {}, [], dict.fromkeys(model.branch_names, 0.0)

    def keep(outputs):
        total = 0.0
        for b, value in outputs.items():
            if b in previous:
                change = float((value.float() - previous[b].float()).norm())
                branch_change[b] += change
                total += change
            previous[b] = value
        step_change.append(total)

    final = _record(model, labels, steps, sampler, cfg_scale, seed, None, keep)
    if steps > 1:
        step_change[0] = step_change[1]
    return Changes(np.array(step_change), branch_change), final


def _placed(count: int, weights: np.ndarray) -> list[int]:
    """`count` distinct steps (step 0 first) at the quantiles 0, 1/count, ... of the cumulative `weights`."""
    steps = len(weights)
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])
    cumulative = cumulative / cumulative[-1] if cumulative[-1] > 0 else np.linspace(0, 1, steps + 1)
    chosen = []
    for i in range(count):
        s = int(np.searchsorted(cumulative, i / count, side="right")) - 1
        chosen.append(min(max(s, chosen[-1] + 1 if chosen else 0), steps - (count - i)))
    return chosen


def _tiers(changes: Changes, flops: dict[str, float]) -> tuple[list[str], float]:
    """(the branches of most change per FLOP, about TIER_SHARE of the FLOPs: at least one, not all; their share)."""
    total, share, tier = sum(flops.values()), 0.0, []
    for b in sorted(flops, key=lambda b: -changes.branch[b] / flops[b]):
        if tier and (share + flops[b] / total > TIER_SHARE + 1e-9 or len(tier) == len(flops) - 1):
            break
        tier.append(b)
        share += flops[b] / total
    return tier, share


class Candidate(NamedTuple):
    name: str
    plan: CachePlan
    interval: bool  # an interval plan (the baseline), or a structured schedule


def candidate_plans(changes: Changes, flops: dict[str, float], forecast: int = 0,
                    factors: str = "float32") -> list[Candidate]:
    """The compute family (module docstring), intervals first; schedules that repeat an earlier candidate's are left
    out."""
    steps = len(changes.step)
    common = dict(forecast=forecast, factors=factors)
    family = [Candidate("none", CachePlan.none(), True)]
    family += [Candidate(f"interval{n}", CachePlan.interval(n, **common), True) for n in range(2, MAX_INTERVAL + 1)]
    tier, share = _tiers(changes, flops)
    rest = tuple(b for b in flops if b not in tier)
    for stride in STRIDES:
        count = math.ceil(steps / stride)
        for power in PLACEMENT_POWERS:
            full = set(_placed(count, changes.step ** power))
            family.append(Candidate(f"placed{count}-power{power:g}",
                                    CachePlan.from_steps([s in full for s in range(steps)], **common), False))
        fresh = min(steps, round(TIER_RATIO * count))
        full_count = max(1, round((count - share * fresh) / (1 - share)))
        if full_count >= fresh:
            continue
        refresh = _placed(fresh, np.ones(steps))
        full = {refresh[i] for i in _placed(full_count, np.ones(fresh))}
        graphs = ["full" if s in full else "reuse1" if s in refresh else "reuse" for s in range(steps)]
        plan = CachePlan.from_steps(graphs, branches="all", reuse_sets=(rest,), **common)
        family.append(Candidate(f"tiers{fresh}/{full_count}", plan, False))
    unique, seen = [], set()
    for candidate in family:
        sets = candidate.plan.reuse_sets_of(list(flops))
        key = tuple(tuple(sets.get(g, ())) for g in candidate.plan.step_graphs(steps))
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique


def sample_errors(model, plan: CachePlan, labels, steps: int, sampler: str, cfg_scale: float, seed: int,
                  reference: torch.Tensor, sample_ids=None) -> torch.Tensor:
    """Per sample, Σ (x − x₀)² / Σ x₀² of its final sample x under `plan` against the uncached `reference` x₀."""
    final = sample(model, labels, steps, sampler, cfg_scale, seed=seed, plan=plan, sample_ids=sample_ids)
    squared = ((final - reference).double() ** 2).flatten(1).sum(1)
    return (squared / (reference.double() ** 2).flatten(1).sum(1).clamp(min=1e-30)).cpu()


def sample_error(model, plan: CachePlan, labels, steps: int, sampler: str, cfg_scale: float, seed: int,
                 reference: torch.Tensor, sample_ids=None) -> float:
    """The geometric mean of `sample_errors` (−10 log10 of it: the samples' mean SNR in dB against the uncached
    ones); 0 for a plan that reproduces them."""
    errors = sample_errors(model, plan, labels, steps, sampler, cfg_scale, seed, reference, sample_ids)
    return float(errors.log().mean().exp())


def choose(candidates: list[dict], target: float) -> dict | None:
    """The answer for a compute fraction `target` among evaluated candidates ({"compute_fraction", "error"}), listed
    by compute fraction: the least error within `target`, the first at a tie. None when no error is finite."""
    chosen = None
    for candidate in candidates:
        if candidate["compute_fraction"] > target:
            break
        if candidate["error"] < (chosen["error"] if chosen else math.inf):
            chosen = candidate
    return chosen


def evaluate_candidates(model, limit: float, forecast: int, factors: str, labels, steps: int, sampler: str,
                        cfg_scale: float, seed: int) -> tuple[list[dict], dict[str, CachePlan]]:
    """Build the compute family on uncached trajectories of `labels` and sample every candidate whose compute
    fraction is at most `limit`: ([{"name", "compute_fraction", "error", "interval"}] in walk order, plans by name)."""
    flops = branch_flops(model.config)
    changes, reference = _measure(model, labels, steps, sampler, cfg_scale, seed)
    family = candidate_plans(changes, flops, forecast, factors)
    fractions = [c.plan.compute_fraction(steps, flops) for c in family]
    plans, evaluated = {}, []
    for i in sorted(range(len(family)), key=lambda i: (fractions[i], not family[i].interval, i)):
        if fractions[i] > limit:
            break
        name, plan, interval = family[i]
        error = sample_error(model, plan, labels, steps, sampler, cfg_scale, seed, reference)
        plans[name] = plan
        evaluated.append({"name": name, "compute_fraction": fractions[i], "error": error, "interval": interval})
    return evaluated, plans


def compute_search(model, search: PlanSearch, labels, steps: int, sampler: str, cfg_scale: float, seed: int):
    """(plan for a `compute` target, summary: the candidates sampled with their compute fraction and error, the
    answer, the best interval plan's error within the target)."""
    target = {"compute": search.value}
    if search.value >= 1:
        return CachePlan.none(), {"target": target, "chosen": "none", "compute_fraction": 1.0, "error": 0.0}
    check_search(search, steps, model.config)
    evaluated, plans = evaluate_candidates(model, search.value, search.forecast, search.factors, labels, steps,
                                           sampler, cfg_scale, seed)
    chosen = choose(evaluated, search.value)
    if chosen is None:
        raise QandcError(f"{search.spec}: no candidate plan gave a finite error (does the model output NaNs?)")
    summary = {"target": target, "family": FAMILY, "chosen": chosen["name"],
               "compute_fraction": chosen["compute_fraction"], "error": chosen["error"],
               "interval_error": min(c["error"] for c in evaluated if c["interval"]), "samples": len(labels),
               "candidates": evaluated}
    return plans[chosen["name"]], summary


def auto_plan(model, search: PlanSearch, steps: int, sampler: str, cfg_scale: float, seed: int, samples: int = 4):
    """(plan, summary) for `search`, measured on `samples` trajectories (labels i % classes). Memory: `err` and
    `reuse` keep every branch output of every step in float16 for those samples (about 0.3 GB for the reference model
    at 4 samples); `compute` keeps one step's."""
    labels = torch.arange(samples) % model.config.num_classes
    if search.kind == "compute":
        return compute_search(model, search, labels, steps, sampler, cfg_scale, seed)
    return search_plan(reuse_errors(model, labels, steps, sampler, cfg_scale, seed), search)
