"""CachePlan: which sampling steps run the full path, and which branches the reuse path takes from the cache.

One plain, JSON-serialisable object that every stage and backend reads; none re-derives it.
CLI grammar: `none | interval=N[,branches=all|attn|mlp|NAME+NAME+...][,regate=0|1] | PLAN.json`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..artifacts import read_json
from ..errors import QandcError

BRANCH_GROUPS = ("all", "attn", "mlp")
STEP_KINDS = ("full", "reuse")
BRANCH_NAME = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(attn|mlp)")


@dataclass(frozen=True)
class CachePlan:
    """every: a full step every N steps (step 0 always full), used when `schedule` is None; "interval" in JSON.
    schedule: explicit "full"/"reuse" per sampling step; ties the plan to that step count.
    branches: the reuse set: "all", "attn", "mlp" or a tuple of branch names (`blocks.<i>.attn|mlp`).
    regate: multiply cached (pre-gate) branch outputs by the current step's adaLN gate (True), or reuse the gated
    outputs as they are (False)."""

    every: int = 1
    schedule: tuple[str, ...] | None = None
    branches: str | tuple[str, ...] = "all"
    regate: bool = False

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise QandcError(f"cache plan: interval must be a positive integer, got {self.every!r}")
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)):
                raise QandcError(f"cache plan: schedule must be a list of 'full' / 'reuse', got {self.schedule!r}")
            object.__setattr__(self, "schedule", tuple(self.schedule))
            bad = [s for s in self.schedule if s not in STEP_KINDS]
            if bad or not self.schedule:
                raise QandcError(f"cache plan: schedule entries must be 'full' or 'reuse', got {bad[:3] or 'none'}")
            if self.schedule[0] != "full":
                raise QandcError("cache plan: the first step must be full (nothing is cached before it)")
        if isinstance(self.branches, str):
            if self.branches not in BRANCH_GROUPS:
                raise QandcError(f"cache plan: branches must be all, attn, mlp or a list of names, "
                                 f"got {self.branches!r}")
        elif not isinstance(self.branches, (list, tuple)):
            raise QandcError(f"cache plan: branches must be all, attn, mlp or a list of names, got {self.branches!r}")
        else:
            object.__setattr__(self, "branches", tuple(self.branches))
            bad = [b for b in self.branches if not (isinstance(b, str) and BRANCH_NAME.fullmatch(b))]
            if bad:
                raise QandcError(f"cache plan: {bad[0]!r} is not a branch name (blocks.<i>.attn or blocks.<i>.mlp)")
        if not isinstance(self.regate, bool):
            raise QandcError(f"cache plan: regate must be true or false, got {self.regate!r}")

    # constructors
    @classmethod
    def none(cls) -> "CachePlan":
        return cls(every=1, branches=())

    @classmethod
    def interval(cls, n: int, branches="all", regate: bool = False) -> "CachePlan":
        """A full step every `n` steps; FORA when branches="all"."""
        return cls(every=n, branches=branches, regate=regate)

    @classmethod
    def from_steps(cls, schedule, branches="all", regate: bool = False) -> "CachePlan":
        """An explicit per-step list of "full"/"reuse" (or booleans: True = full)."""
        steps = ["full" if s is True else "reuse" if s is False else s for s in schedule]
        return cls(schedule=tuple(steps), branches=branches, regate=regate)

    # queries
    def full_steps(self, num_steps: int) -> list[bool]:
        """For each sampling step, True where the full path runs."""
        if self.schedule is None:
            return [i % self.every == 0 for i in range(num_steps)]
        if len(self.schedule) != num_steps:
            raise QandcError(f"cache plan: its schedule has {len(self.schedule)} steps, the sampler {num_steps}")
        return [s == "full" for s in self.schedule]

    def reuse_set(self, branch_names: list[str]) -> list[str]:
        """The branch names the reuse path takes from the cache, checked against the model's branches."""
        if isinstance(self.branches, str):
            return [b for b in branch_names if self.branches == "all" or b.endswith("." + self.branches)]
        unknown = sorted(set(self.branches) - set(branch_names))
        if unknown:
            raise QandcError(f"cache plan names branches the model lacks: {', '.join(unknown[:4])} "
                             f"(the model has blocks.0 .. blocks.{len(branch_names) // 2 - 1}, attn and mlp)")
        return [b for b in branch_names if b in self.branches]

    def describe(self) -> str:
        """Short text for file names and logs."""
        if self.branches == ():
            return "nocache"
        steps = f"interval{self.every}" if self.schedule is None else f"sched{self.schedule.count('full')}"
        branches = self.branches if isinstance(self.branches, str) else f"{len(self.branches)}br"
        return f"{steps}-{branches}-regate{int(self.regate)}"

    # serialisation
    def to_dict(self) -> dict:
        return {"interval": self.every, "schedule": list(self.schedule) if self.schedule else None,
                "branches": self.branches if isinstance(self.branches, str) else list(self.branches),
                "regate": self.regate}

    @classmethod
    def from_dict(cls, data: dict) -> "CachePlan":
        if not isinstance(data, dict):
            raise QandcError("cache plan: expected a JSON object")
        unknown = set(data) - {"interval", "schedule", "branches", "regate"}
        if unknown:
            raise QandcError(f"cache plan: unknown keys {', '.join(sorted(unknown))}")
        return cls(every=data.get("interval", 1), schedule=data.get("schedule"),
                   branches=data.get("branches", "all"), regate=data.get("regate", False))

    @classmethod
    def parse(cls, spec: str) -> "CachePlan":
        """Parse the CLI grammar (see the module docstring)."""
        spec = spec.strip()
        if spec == "none":
            return cls.none()
        if spec.endswith(".json"):
            data = read_json(spec, "no such cache plan file")
            try:
                return cls.from_dict(data)
            except QandcError as e:
                raise QandcError(f"{spec}: {e}") from None
        fields = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("interval", "branches", "regate") or key in fields:
                raise QandcError(f"cache spec {spec!r}: expected none | interval=N[,branches=all|attn|mlp|"
                                 "NAME+NAME...][,regate=0|1] | PLAN.json")
            fields[key] = value
        if "interval" not in fields or not fields["interval"].isdigit():
            raise QandcError(f"cache spec {spec!r}: interval=N with N a positive integer is required")
        if fields.get("regate", "0") not in ("0", "1"):
            raise QandcError(f"cache spec {spec!r}: regate must be 0 or 1")
        branches = fields.get("branches", "all")
        if branches not in BRANCH_GROUPS:
            branches = tuple(branches.split("+"))
        return cls.interval(int(fields["interval"]), branches, fields.get("regate") == "1")
