"""`export`: an ONNX file per graph of the cache plan (full.onnx, reuse.onnx, reuse1.onnx, ...) + manifest.json from a
DiT, a cache plan and optionally a quant recipe, whose recipe.json and amax.safetensors are copied in: an export
folder is all build-engine reads (with the checkpoint, for the Inductor backend, named by its path relative to the
export and its sha256)."""

from __future__ import annotations

import copy
import platform
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import atomic_path
from ..errors import QandcError
from ..formats.manifest import ExportManifest, pipeline_fields
from ..formats.recipe import AMAX, RECIPE
from ..locking import holds_output
from ..model.graphs import PathGraph, example_feeds
from ..progress import progress
from ..sampling import CachePlan
from ..staging import check_apart, staged_folder
from .onnx_export import export_graph


@holds_output("export")
def export(model, out: str | Path, plan: CachePlan | None = None, recipe_dir: str | Path | None = None,
           checkpoint: str | Path = "") -> ExportManifest:
    """Write the graphs and the manifest; with a recipe, its plan, Q/DQ scales, sampler settings and VC table are
    used (a different `plan` is an error). Returns the manifest."""
    check_apart(out, {"--checkpoint": checkpoint, "--recipe": recipe_dir}, ExportManifest.KIND)
    fields = pipeline_fields(model, plan, recipe_dir, None, checkpoint, folder=out)
    if fields["plan"].forecast and fields["plan"].factors == "bf16":
        raise QandcError("ONNX graphs take float32 factors; factors=bf16 is for the Inductor engines")
    if recipe_dir is not None:
        from ..calibration import apply_recipe

        model, _ = apply_recipe(copy.deepcopy(model), recipe_dir)
    model = model.eval()
    with staged_folder(out, ExportManifest.KIND) as staging:  # `out` stays as it was until the export is whole
        return _write(model, staging, fields, recipe_dir)


def _write(model, out: Path, fields: dict, recipe_dir) -> ExportManifest:
    """The graphs, the recipe's files and, last, the manifest, in the (staging) folder `out`."""
    feeds = example_feeds(model, fields["graphs"])
    checks = {name: export_graph(PathGraph(model, spec), feeds[name], spec, out / f"{name}.onnx")
              for name, spec in progress(fields["graphs"].items(), "export", total=len(fields["graphs"]))}
    copied = []
    if recipe_dir is not None:  # what the Inductor backend builds from
        for name in (RECIPE, AMAX):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(Path(recipe_dir) / name, tmp)
            copied.append(name)
    onnx = {name: f"{name}.onnx" for name in fields["graphs"]}
    files = sorted(p.name for p in out.iterdir() if p.name.startswith(tuple(onnx.values()))) + copied
    manifest = ExportManifest(**fields, onnx=onnx, checks=checks, versions={
        "qandc": __version__, "torch": torch.__version__, "onnx": __import__("onnx").__version__,
        "python": platform.python_version()})
    manifest.write(out, files)
    return manifest
