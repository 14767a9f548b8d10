"""CachePlan: which sampling steps run the full path, which branches each reuse step takes from the cache, and
whether cached outputs are reused as they are or forecast.

One plain, JSON-serialisable object that every stage and backend reads; none re-derives it.
CLI grammar: `none | interval=N[,branches=all|attn|mlp|NAME+NAME+...][,regate=0|1][,forecast=K][,factors=F]
| PLAN.json` (a plan, or the `plan.json` a calibration's search keeps: its plan); searched plans (`auto...`) are
the calibration's (`qandc.calibration.plan_search`).

Reuse sets: a plan has one reuse set (`branches`, the graph "reuse") and, in an explicit schedule, up to
MAX_REUSE_SETS - 1 more (`reuse_sets`, the graphs "reuse1", "reuse2", ...). Each is its own engine graph, so a
reuse step skips the compute of its set; a per-step branch mask would compute every branch anyway.

Forecasting (`forecast=K`, K = 1 or 2): instead of reusing a branch's last output, the reuse path evaluates the
Newton form of the polynomial through the branch's last K+1 computations, at their actual step indices (divided
differences; TaylorSeer's Taylor factors generalised to irregular spacing). K = 0 is plain reuse. The cache then
holds K+1 factors per branch, in `factors` precision ("float32" or "bf16").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..artifacts import read_json
from ..errors import QandcError

BRANCH_GROUPS = ("all", "attn", "mlp")
BRANCH_NAME = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(attn|mlp)")
MAX_REUSE_SETS = 4
FORECAST_ORDERS = (0, 1, 2)
FACTOR_DTYPES = ("float32", "bf16")
# searched plans, parsed by qandc.calibration.plan_search
AUTO_GRAMMAR = "auto[:err=E|:reuse=F|:compute=F][,forecast=0|1|2][,factors=float32|bf16] (E > 0, 0 < F <= 1)"
GRAMMAR = ("none | interval=N[,branches=all|attn|mlp|NAME+NAME...][,regate=0|1][,forecast=0|1|2]"
           "[,factors=float32|bf16] | PLAN.json")
# The default plan of `calibrate` and `run`: a search, so it fits any model, at the compute fraction and forecast
# order the measured speed / quality front shows best on the reference model under DDPM-50 (benchmarks/results/
# front-h200.json: 0.4 with forecast 1 holds FD within 1.10x of float32 in bf16, FP8 and INT8; 0.5 and 0.34 do not).
DEFAULT_COMPUTE, DEFAULT_FORECAST = 0.4, 1
DEFAULT_PLAN_SEARCH = f"auto:compute={DEFAULT_COMPUTE:g},forecast={DEFAULT_FORECAST}"


def reuse_graph_name(index: int) -> str:
    """The graph of reuse set `index`: "reuse", "reuse1", "reuse2", ..."""
    return "reuse" if index == 0 else f"reuse{index}"


def _branches(value, what: str):
    """A reuse set as given (a group name or a tuple of branch names), checked."""
    if isinstance(value, str):
        if value not in BRANCH_GROUPS:
            raise QandcError(f"cache plan: {what} must be all, attn, mlp or a list of names, got {value!r}")
        return value
    if not isinstance(value, (list, tuple)):
        raise QandcError(f"cache plan: {what} must be all, attn, mlp or a list of names, got {value!r}")
    bad = [b for b in value if not (isinstance(b, str) and BRANCH_NAME.fullmatch(b))]
    if bad:
        raise QandcError(f"cache plan: {bad[0]!r} is not a branch name (blocks.<i>.attn or blocks.<i>.mlp)")
    return tuple(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CachePlan:
    """every: a full step every N steps (step 0 always full), used when `schedule` is None; "interval" in JSON.
    schedule: the graph of each sampling step ("full", "reuse", "reuse1", ...); ties the plan to that step count.
    branches: reuse set 0 (graph "reuse"): "all", "attn", "mlp" or a tuple of branch names (`blocks.<i>.attn|mlp`).
    reuse_sets: further reuse sets (tuples of names) for the graphs "reuse1", "reuse2", ...; schedules only.
    regate: multiply cached (pre-gate) branch outputs by the current step's adaLN gate (True), or reuse the gated
    outputs as they are (False).
    forecast: 0 reuses cached outputs as they are; 1 or 2 forecasts them (see the module docstring).
    factors: the precision of the forecast factors ("float32" or "bf16"); plain reuse keeps the model's."""

    every: int = 1
    schedule: tuple[str, ...] | None = None
    branches: str | tuple[str, ...] = "all"
    regate: bool = False
    forecast: int = 0
    factors: str = "float32"
    reuse_sets: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if not _integer(self.every) or self.every < 1:
            raise QandcError(f"cache plan: interval must be a positive integer, got {self.every!r}")
        object.__setattr__(self, "branches", _branches(self.branches, "branches"))
        if not isinstance(self.reuse_sets, (list, tuple)):
            raise QandcError(f"cache plan: reuse_sets must be a list of branch-name lists, got {self.reuse_sets!r}")
        sets = tuple(_branches(s, "each of reuse_sets") for s in self.reuse_sets)
        if any(isinstance(s, str) for s in sets) or len(sets) > MAX_REUSE_SETS - 1:
            raise QandcError(f"cache plan: reuse_sets holds at most {MAX_REUSE_SETS - 1} lists of branch names")
        object.__setattr__(self, "reuse_sets", sets)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise QandcError(f"cache plan: schedule must be a list of graph names, got {self.schedule!r}")
            object.__setattr__(self, "schedule", tuple(self.schedule))
            known = ("full", *self.graph_names)
            bad = [s for s in self.schedule if s not in known]
            if bad:
                raise QandcError(f"cache plan: schedule entries must be {', '.join(known)}; got {bad[0]!r}")
            if self.schedule[0] != "full":
                raise QandcError("cache plan: the first step must be full (nothing is cached before it)")
        elif sets:
            raise QandcError("cache plan: reuse_sets need an explicit schedule that names them")
        if not isinstance(self.regate, bool):
            raise QandcError(f"cache plan: regate must be true or false, got {self.regate!r}")
        if not _integer(self.forecast) or self.forecast not in FORECAST_ORDERS:
            raise QandcError(f"cache plan: forecast must be 0, 1 or 2, got {self.forecast!r}")
        if self.factors not in FACTOR_DTYPES:
            raise QandcError(f"cache plan: factors must be float32 or bf16, got {self.factors!r}")

    # constructors
    @classmethod
    def none(cls) -> "CachePlan":
        return cls(every=1, branches=())

    @classmethod
    def interval(cls, n: int, branches="all", regate: bool = False, forecast: int = 0,
                 factors: str = "float32") -> "CachePlan":
        """A full step every `n` steps; FORA when branches="all", TaylorSeer-like with `forecast`."""
        return cls(every=n, branches=branches, regate=regate, forecast=forecast, factors=factors)

    @classmethod
    def from_steps(cls, schedule, branches="all", regate: bool = False, forecast: int = 0,
                   factors: str = "float32", reuse_sets=()) -> "CachePlan":
        """An explicit per-step list of graph names (or booleans: True = "full", False = "reuse")."""
        steps = ["full" if s is True else "reuse" if s is False else s for s in schedule]
        return cls(schedule=tuple(steps), branches=branches, regate=regate, forecast=forecast, factors=factors,
                   reuse_sets=reuse_sets)

    # queries
    @property
    def graph_names(self) -> tuple[str, ...]:
        """The reuse graphs of the plan, in reuse-set order."""
        return tuple(reuse_graph_name(i) for i in range(1 + len(self.reuse_sets)))

    @property
    def caches(self) -> bool:
        """Whether any step takes anything from the cache."""
        return self.branches != () or any(self.reuse_sets)

    def step_graphs(self, num_steps: int) -> list[str]:
        """For each sampling step, the graph it runs ("full" or a reuse graph)."""
        if self.schedule is None:
            return ["full" if i % self.every == 0 else "reuse" for i in range(num_steps)]
        if len(self.schedule) != num_steps:
            raise QandcError(f"cache plan: its schedule has {len(self.schedule)} steps, the sampler {num_steps}")
        return list(self.schedule)

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each sampling step, True where the full path runs."""
        return [g == "full" for g in self.step_graphs(num_steps)]

    def reuse_sets_of(self, branch_names: list[str]) -> dict[str, list[str]]:
        """Reuse graph name -> the branches it takes from the cache (execution order), checked against the model."""
        sets = {}
        for name, chosen in zip(self.graph_names, (self.branches, *self.reuse_sets)):
            if isinstance(chosen, str):
                sets[name] = [b for b in branch_names if chosen == "all" or b.endswith("." + chosen)]
                continue
            unknown = sorted(set(chosen) - set(branch_names))
            if unknown:
                raise QandcError(f"cache plan names branches the model lacks: {', '.join(unknown[:4])} "
                                 f"(the model has blocks.0 .. blocks.{len(branch_names) // 2 - 1}, attn and mlp)")
            sets[name] = [b for b in branch_names if b in chosen]
        return sets

    def reuse_set(self, branch_names: list[str]) -> list[str]:
        """The branches of reuse set 0 (every set checked against the model's branches)."""
        return self.reuse_sets_of(branch_names)["reuse"]

    def cached_branches(self, branch_names: list[str]) -> list[str]:
        """Every branch some reuse set takes from the cache, in execution order: what the full graph emits."""
        union = set().union(*self.reuse_sets_of(branch_names).values())
        return [b for b in branch_names if b in union]

    def compute_fraction(self, num_steps: int, branch_flops: dict[str, float]) -> float:
        """The FLOPs of the branch computations the plan runs over those of the uncached run, with `branch_flops`
        the cost of each branch (`qandc.model.branch_flops`)."""
        sets = self.reuse_sets_of(list(branch_flops))
        total = sum(branch_flops.values())
        done = sum(total - sum(branch_flops[b] for b in sets.get(g, ())) for g in self.step_graphs(num_steps))
        return done / (total * num_steps)

    def describe(self) -> str:
        """Short text for file names and logs."""
        if not self.caches:
            return "nocache"
        steps = f"interval{self.every}" if self.schedule is None else f"sched{self.schedule.count('full')}"
        branches = self.branches if isinstance(self.branches, str) else f"{len(self.branches)}br"
        sets = f"-{1 + len(self.reuse_sets)}sets" if self.reuse_sets else ""
        forecast = f"-forecast{self.forecast}{'bf16' if self.factors == 'bf16' else ''}" if self.forecast else ""
        return f"{steps}-{branches}{sets}-regate{int(self.regate)}{forecast}"

    # serialisation
    def to_dict(self) -> dict:
        return {"interval": self.every, "schedule": list(self.schedule) if self.schedule else None,
                "branches": self.branches if isinstance(self.branches, str) else list(self.branches),
                "reuse_sets": [list(s) for s in self.reuse_sets], "regate": self.regate,
                "forecast": self.forecast, "factors": self.factors}

    @classmethod
    def from_dict(cls, data: dict) -> "CachePlan":
        if not isinstance(data, dict):
            raise QandcError("cache plan: expected a JSON object")
        unknown = set(data) - {"interval", "schedule", "branches", "reuse_sets", "regate", "forecast", "factors"}
        if unknown:
            raise QandcError(f"cache plan: unknown keys {', '.join(sorted(unknown))}")
        return cls(every=data.get("interval", 1), schedule=data.get("schedule"),
                   branches=data.get("branches", "all"), regate=data.get("regate", False),
                   forecast=data.get("forecast", 0), factors=data.get("factors", "float32"),
                   reuse_sets=data.get("reuse_sets", ()))

    @classmethod
    def parse(cls, spec: str) -> "CachePlan":
        """Parse the CLI grammar (see the module docstring)."""
        spec = spec.strip()
        if spec == "none":
            return cls.none()
        if spec.endswith(".json"):
            data = read_json(spec, "no such cache plan file")
            if isinstance(data, dict) and {"plan", "search"} <= set(data):  # a search's plan.json: the plan it chose
                data = data["plan"]
            try:
                return cls.from_dict(data)
            except QandcError as e:
                raise QandcError(f"{spec}: {e}") from None
        fields = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("interval", "branches", "regate", "forecast", "factors") or key in fields:
                raise QandcError(f"cache spec {spec!r}: expected {GRAMMAR}")
            fields[key] = value
        if "interval" not in fields or not fields["interval"].isdigit():
            raise QandcError(f"cache spec {spec!r}: interval=N with N a positive integer is required")
        if fields.get("regate", "0") not in ("0", "1"):
            raise QandcError(f"cache spec {spec!r}: regate must be 0 or 1")
        if fields.get("forecast", "0") not in ("0", "1", "2"):
            raise QandcError(f"cache spec {spec!r}: forecast must be 0, 1 or 2")
        branches = fields.get("branches", "all")
        if branches not in BRANCH_GROUPS:
            branches = tuple(branches.split("+"))
        return cls.interval(int(fields["interval"]), branches, fields.get("regate") == "1",
                            int(fields.get("forecast", "0")), fields.get("factors", "float32"))


def default_plan_shape(steps: int) -> "CachePlan":
    """The shape of the plan the default search picks (its compute fraction and forecast order; full steps evenly
    spaced), for timing random weights, where a search measures nothing: a plan's speed depends on how many steps run
    each graph, not on which."""
    count = max(1, round(DEFAULT_COMPUTE * steps))
    full = {math.floor(i * steps / count) for i in range(count)}
    return CachePlan.from_steps([s in full for s in range(steps)], forecast=DEFAULT_FORECAST)
