"""`export`: full.onnx + reuse.onnx + manifest.json from a DiT, a cache plan and optionally a quant recipe."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import sha256_file, write_json
from ..errors import QandcError
from ..sampling import CachePlan
from .onnx_export import FullGraph, ReuseGraph, export_graph, sample_inputs

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def export(model, out: str | Path, plan: CachePlan | None = None, recipe_dir: str | Path | None = None,
           checkpoint: str = "", steps: int = 50, sampler: str = "ddpm", cfg_scale: float = 1.5) -> dict:
    """Write the two graphs and the manifest; with a recipe, its plan, Q/DQ scales, sampler settings and VC table
    are used (a different `plan` is an error). Returns the manifest."""
    out = Path(out)
    recipe, vc = None, None
    if recipe_dir is not None:
        from ..calibration import EXPORTABLE, apply_recipe, load_vc

        model, recipe = apply_recipe(copy.deepcopy(model), recipe_dir)
        if recipe.preset not in EXPORTABLE:
            raise QandcError(f"{recipe_dir}: {recipe.preset} is fake quant only (quality study); export takes "
                             f"{' or '.join(EXPORTABLE)}")
        if plan is not None and plan != recipe.cache_plan:
            raise QandcError(f"the cache plan differs from the recipe's ({recipe.cache_plan.to_dict()}); leave "
                             "--cache out")
        plan, steps, sampler, cfg_scale = recipe.cache_plan, recipe.steps, recipe.sampler, recipe.cfg_scale
        vc = load_vc(recipe_dir)
    plan = plan or CachePlan.none()
    branches = plan.reuse_set(model.branch_names)
    model = model.eval()
    x, t, y = sample_inputs(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # it marks a finished export: none while the graphs are rewritten
    graphs = {"full": export_graph(FullGraph(model, branches, plan.regate), (x, t, y), ["x", "t", "y"],
                                   ["out", *branches], out / "full.onnx")}
    with torch.no_grad():
        _, cache = model.forward_full(x, t, y, branches=branches, regate=plan.regate)
    graphs["reuse"] = export_graph(ReuseGraph(model, branches, plan.regate), (x, t, y, *[cache[b] for b in branches]),
                                   ["x", "t", "y", *branches], ["out"], out / "reuse.onnx")
    files = sorted(p.name for p in out.iterdir() if p.name.startswith(("full.onnx", "reuse.onnx")))
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "onnx-export", "model": model.config.to_dict(),
        "guidance": model.config.guidance, "plan": plan.to_dict(), "cache_inputs": branches,
        "sampler": {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale},
        "recipe": None if recipe is None else {"path": str(recipe_dir), "preset": recipe.preset,
                                               "sha256": sha256_file(Path(recipe_dir) / "recipe.json"),
                                               "calibration_data": str(Path(recipe_dir) / "pool.npz")},
        "vc": None if vc is None else vc.tolist(), "checkpoint": checkpoint, "graphs": graphs,
        "files": {name: sha256_file(out / name) for name in files},
        "versions": {"qandc": __version__, "torch": torch.__version__, "onnx": _version("onnx"),
                     "python": platform.python_version()},
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _version(module: str) -> str:
    return __import__(module).__version__
