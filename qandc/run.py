"""`qandc run`: calibrate -> export -> build-engine -> generate (through the engines) -> eval, in one folder.

Each stage writes its own sub-folder (recipe/, onnx/, engines/, samples/) and is skipped on a rerun when its
artifacts are there and valid: calibration resumes stage by stage, the export and the engines are kept when their
manifests' checksums verify and they were made from the current upstream artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .artifacts import sha256_file
from .errors import QandcError
from .formats.manifest import EngineManifest, ExportManifest
from .locking import holds_output


def _valid(folder: Path, kind, lineage: dict, backend: str | None = None) -> bool:
    """Whether a stage folder holds a manifest of `kind` whose files verify, made from the inputs `lineage` names
    (and with `backend`)."""
    try:
        manifest = kind.read(folder, lineage=lineage)
    except (QandcError, OSError, ValueError):  # ValueError: a file name the OS refuses
        return False
    return backend is None or manifest.backend == backend


@holds_output("run")
def run(model, out: str | Path, settings, backend: str, checkpoint: str, labels: Sequence[int],
        per_class: int = 1) -> dict:
    """Run every stage (skipping valid ones); return the evaluation of the engine samples. `labels` (each label
    `per_class` times in a row, one grid row per label) are sampled with the calibration's sampler settings and
    seed."""
    from .calibration import calibrate
    from .engines import build_engines
    from .exporter import export
    from .metrics.evaluate import evaluate
    from .model.checkpoint import read_sidecar
    from .runtime import Pipeline, Provenance, SamplingOptions, generate

    out = Path(out)
    recipe_dir, onnx_dir, engine_dir, samples_dir = (out / n for n in ("recipe", "onnx", "engines", "samples"))
    print("[1/5] calibrate", file=sys.stderr)
    calibrate(model, recipe_dir, settings, checkpoint)
    recipe_sha = sha256_file(recipe_dir / "recipe.json")
    print("[2/5] export", file=sys.stderr)
    if not _valid(onnx_dir, ExportManifest, {"recipe": recipe_sha}):
        export(model, onnx_dir, recipe_dir=recipe_dir, checkpoint=checkpoint)
    print("[3/5] build-engine", file=sys.stderr)
    export_sha = sha256_file(onnx_dir / "manifest.json")
    if not _valid(engine_dir, EngineManifest, {"export": export_sha}, backend):
        build_engines(onnx_dir, engine_dir, backend)
    print("[4/5] generate", file=sys.stderr)
    options = SamplingOptions(steps=settings.steps, sampler=settings.sampler, cfg_scale=settings.cfg_scale,
                              seed=settings.seed)
    generate(Pipeline.load(engine_dir), labels, samples_dir, options, provenance=Provenance.of_engines(engine_dir),
             per_class=per_class, class_names=read_sidecar(checkpoint).get("classes") or [])
    print("[5/5] eval", file=sys.stderr)
    return evaluate(samples_dir, record_in=out)
