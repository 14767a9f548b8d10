"""`calibrate`: pool -> selection -> quantization recipe -> VC table, each stage an artifact in the output folder.

A rerun skips every stage whose artifact exists with the same parameters; an artifact made with other parameters
is an error (use another --out), never silently mixed. Every file is written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ..progress import progress

from ..artifacts import read_json, write_json
from ..distributed import World
from ..errors import QandcError
from ..formats.lineage import check_recipe_checkpoint, reference
from ..formats.recipe import RECIPE, QuantRecipe, quantizer_formats, write_vc
from ..locking import holds_output
from ..model.graphs import GraphSpec, engine_graphs
from ..sampling import CachePlan, space_timesteps
from ..sampling.plan import DEFAULT_PLAN_SEARCH
from ..sampling.diffusion import TRAIN_STEPS
from ..values import INT_LIMIT, check, integer, real
from .plan_search import PlanSearch, auto_plan, check_search, parse_auto
from .pool import CalibrationEntry, Pool, collect_pool, replay, run_entries
from .quantize import quantize, quantized_layers, save_amax
from .selection import SELECTORS, SelectorParams, read_selection, select
from .sensitivity import REPORT, sensitivity_report, write_report
from .vc import VC_FORMS, fit_vc

POOL_SHARDS = "pool-shards"


@dataclass
class CalibrationSettings:
    preset: str = "w8a8-fp8"
    selector: str = "tap"
    budget: int = 800
    plan: CachePlan | PlanSearch | str = DEFAULT_PLAN_SEARCH  # or its CLI text
    plan_samples: int = 4     # trajectories the plan search measures
    pool_samples: int = 400
    steps: int = 50
    sampler: str = "ddpm"
    cfg_scale: float = 1.5
    seed: int = 0
    selector_params: SelectorParams = field(default_factory=SelectorParams)
    keep: list = field(default_factory=list)
    fp8_weight_per_channel: bool = False
    vc: str = "var"           # "var", "mse", "nsr" or "none"
    vc_samples: int = 256
    batch_size: int = 256

    def __post_init__(self):
        if isinstance(self.plan, str):  # the parsing edge: `--cache` text becomes a typed plan or plan search
            self.plan = parse_auto(self.plan) if self.plan.startswith("auto") else CachePlan.parse(self.plan)


def check_settings(model, s: CalibrationSettings) -> None:
    """Refuse settings calibration cannot run with, before any work."""
    quantizer_formats(s.preset)
    if s.selector not in SELECTORS:
        raise QandcError(f"unknown selector {s.selector!r}; known: {', '.join(SELECTORS)}")
    if s.vc not in VC_FORMS + ("none",):
        raise QandcError(f"unknown VC form {s.vc!r}; choose var, mse, nsr or none")
    counts = {"--pool-samples": s.pool_samples, "--batch-size": s.batch_size}
    if s.vc != "none":
        counts["--vc-samples"] = s.vc_samples
    for flag, value in counts.items():
        if value < 1:
            raise QandcError(f"{flag} must be positive, got {value}")
    space_timesteps(TRAIN_STEPS, s.steps)
    check("--cfg-scale", real, s.cfg_scale)
    check("--seed", integer, s.seed, minimum=0, maximum=INT_LIMIT - 2)  # VC draws its noise from seed + 1
    check("--tau", real, s.selector_params.tau, low=0, low_open=True)
    entries = s.pool_samples * s.steps
    if not 1 <= s.budget <= entries:
        raise QandcError(f"--samples (the calibration budget) must be between 1 and the pool's {entries} entries "
                         f"(--pool-samples x --steps), got {s.budget}")
    if isinstance(s.plan, PlanSearch):
        check_search(s.plan, s.steps, model.config)
    else:
        s.plan.reuse_set(model.branch_names)
        s.plan.full_steps(s.steps)


def _same_or_fail(path: Path, key: dict) -> bool:
    """True when the artifact at `path` was made with `key`; an artifact made otherwise is an error."""
    existing = read_json(path)
    mismatch = [k for k in key if existing.get(k) != key[k]]
    if mismatch:
        raise QandcError(f"{path}: made with other settings ({', '.join(mismatch)}); use another --out")
    return True


def _pool(model, out: Path, s: CalibrationSettings, world: World) -> Pool | None:
    """The pool (None on ranks other than 0): collected in shards across the ranks, merged and saved by rank 0."""
    key = {"seed": s.seed, "num_samples": s.pool_samples, "steps": s.steps, "sampler": s.sampler,
           "cfg_scale": s.cfg_scale, "plan": s.plan.to_dict()}
    if (out / "pool.json").exists() and _same_or_fail(out / "pool.json", key):
        return Pool.load(out) if world.main else None
    pool = collect_pool(model, s.pool_samples, s.steps, s.sampler, s.cfg_scale, s.plan, s.seed, s.batch_size,
                        out / POOL_SHARDS, world)
    if pool is not None:
        pool.save(out)
        shutil.rmtree(out / POOL_SHARDS)  # pool.npz supersedes them
    return pool


def _selection(pool: Pool, out: Path, s: CalibrationSettings) -> np.ndarray:
    path = out / f"selection-{s.selector}.json"
    key = {"selector": s.selector, "params": s.selector_params.to_dict(), "seed": s.seed, "budget": s.budget,
           "pool_id": pool.pool_id}
    if path.exists() and _same_or_fail(path, key):
        return np.array(read_selection(path, len(pool.t))["indices"])
    features = pool.x.reshape(len(pool.t), -1).astype(np.float32)
    indices = select(s.selector, features, pool.t, pool.step, s.budget, s.seed, s.selector_params)
    write_json(path, {**key, "indices": indices.tolist(),
                      "steps_covered": sorted(set(pool.step[indices].tolist())),
                      "reuse_entries": int((~pool.full[indices]).sum())})
    return indices


def _searched_plan(model, out: Path, s: CalibrationSettings) -> CachePlan:
    """Stage 0 for `--cache auto...`: search the plan on measured reuse errors, keep it in plan.json."""
    path = out / "plan.json"
    key = {"spec": s.plan.spec, "steps": s.steps, "sampler": s.sampler, "cfg_scale": s.cfg_scale, "seed": s.seed,
           "samples": s.plan_samples}
    if path.exists() and _same_or_fail(path, key):
        try:
            return CachePlan.from_dict(read_json(path).get("plan"))
        except QandcError as e:
            raise QandcError(f"{path}: {e}") from None
    plan, summary = auto_plan(model, s.plan, s.steps, s.sampler, s.cfg_scale, s.seed, s.plan_samples)
    write_json(path, {**key, "plan": plan.to_dict(), "search": summary})
    return plan


def forward_loop(entries: list[CalibrationEntry], graphs: dict[str, GraphSpec], batch_size: int):
    """The ModelOpt calibration loop: every selected entry through the graph it was recorded on."""
    @torch.no_grad()
    def loop(model):
        for _ in run_entries(model, entries, graphs, batch_size):
            pass
    return loop


@holds_output("calibrate")
def calibrate(model, out: str | Path, s: CalibrationSettings, checkpoint: str | Path = "",
              report: bool = False, world: World = World()) -> QuantRecipe | None:
    """Run (or resume) every stage; return the recipe. `model` is the full-precision DiT (left unchanged), loaded
    from `checkpoint` (recorded in the recipe by sha256 and path, hashed on rank 0 only; "": a model in memory). With
    `report`, also write the sensitivity report (report.json, report.png) unless the folder has one. Under
    torchrun (`world`), the ranks share the pool collection and leave the process group; rank 0 alone goes on and
    returns the recipe, the others return None."""
    check_settings(model, s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    search = s.plan.spec if isinstance(s.plan, PlanSearch) else ""
    if search:
        s = dataclasses.replace(s, plan=world.broadcast(_searched_plan(model, out, s) if world.main else None))
    with progress(total=4, desc="calibrate", enabled=world.main) as stages:  # cleared on errors too
        pool = _pool(model, out, s, world)
        world.close()
        if pool is None:
            return None
        recipe = _stages(model, out, s, checkpoint, stages, pool, search)
    if report and not (out / REPORT).exists():
        write_report(sensitivity_report(model, out, s.batch_size), out)
    return recipe


def _stages(model, out: Path, s: CalibrationSettings, checkpoint: str | Path, stages, pool,
            search: str) -> QuantRecipe:
    """Selection, then recipe and VC table, each skipped when the folder holds it; `search`: the spec the plan was
    searched by ("" for a given plan)."""
    source = reference(checkpoint, out) if checkpoint else {"path": "", "sha256": ""}
    stages.update()
    indices = _selection(pool, out, s)
    stages.update()
    recipe = QuantRecipe(preset=s.preset, layers=quantized_layers(model, s.keep), plan=s.plan,
                         steps=s.steps, sampler=s.sampler, cfg_scale=s.cfg_scale,
                         fp8_weight_per_channel=s.fp8_weight_per_channel, keep=list(s.keep),
                         selector={"name": s.selector, "params": s.selector_params.to_dict(), "seed": s.seed,
                                   "budget": s.budget, "selection": f"selection-{s.selector}.json"},
                         pool_id=pool.pool_id, checkpoint_sha256=source["sha256"], checkpoint=source["path"],
                         model=model.config.to_dict(),
                         vc=None if s.vc == "none" else {"form": s.vc, "samples": s.vc_samples, "seed": s.seed + 1},
                         plan_search=search)
    if (out / RECIPE).exists():
        existing = QuantRecipe.load(out)
        if checkpoint:
            check_recipe_checkpoint(out / RECIPE, existing.checkpoint_sha256, checkpoint)
        if existing != recipe:
            raise QandcError(f"{out / RECIPE}: made with other settings; use another --out")
    else:
        q_model = copy.deepcopy(model)
        entries = replay(model, pool, indices, s.batch_size)
        graphs = engine_graphs(s.plan, model.branch_names)
        quantize(q_model, recipe, forward_loop(entries, graphs, s.batch_size))
        del entries
        save_amax(q_model, out)
        stages.update()
        if recipe.vc:
            labels = torch.arange(s.vc_samples) % model.config.num_classes
            K = fit_vc(model, q_model, labels, s.steps, s.sampler, s.cfg_scale, s.seed + 1, s.plan, s.vc)
            write_vc(out, K)
        recipe.save(out)  # written last: its presence marks a finished calibration
        stages.update()
    return recipe
