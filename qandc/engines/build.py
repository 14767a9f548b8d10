"""`build_engines` / `load_engines`: any registered backend behind one face, with a manifest that carries
everything the runtime needs (model config, cache plan, graph declarations, VC table, recipe, sampler defaults,
lineage) and the sha256 of every file, checked on load."""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__
from ..errors import QandcError
from ..formats.manifest import MANIFEST, EngineManifest, ExportManifest
from ..locking import holds_output
from ..staging import check_apart, staged_folder
from .backend import BuildOptions, Engine, get_backend


@holds_output("build-engine")
def build_engines(onnx_dir: str | Path, out: str | Path, backend: str, max_batch: int = 64,
                  batch_sizes: list[int] = ()) -> EngineManifest:
    """Build the engines of every graph of an export directory with `backend`; returns the engine manifest.
    `max_batch`: a batch profile's largest batch; `batch_sizes`: row counts to compile for at build time."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    chosen = get_backend(backend)
    export = ExportManifest.read(onnx_dir)
    precision = "float" if export.recipe is None else export.recipe["preset"]
    if precision not in chosen.capabilities.precisions:
        raise QandcError(f"the {backend} backend builds {', '.join(chosen.capabilities.precisions)} engines, not "
                         f"{precision} ({onnx_dir})")
    checkpoint = export.lineage.get("checkpoint")
    check_apart(out, {"--onnx": onnx_dir, "the export's checkpoint": checkpoint and onnx_dir / checkpoint["path"]},
                EngineManifest.KIND)
    with staged_folder(out, EngineManifest.KIND) as staging:  # `out` stays as it was until the engines are whole
        result = chosen.build(onnx_dir, export, staging, BuildOptions(max_batch, tuple(batch_sizes)))
        versions = {"qandc": __version__, "python": platform.python_version(), **chosen.versions()}
        manifest = EngineManifest.from_export(export, onnx_dir, out, chosen.name, result.engines, result.record,
                                              versions)
        manifest.write(staging, result.files)
    return manifest


def load_engines(folder: str | Path, compile: bool = True) -> tuple[EngineManifest, dict[str, Engine]]:
    """(manifest, engines by graph name) of an engine directory, every checksum verified. `compile`: engines that
    compile (Inductor on a GPU) run compiled; False runs them eagerly."""
    folder = Path(folder)
    manifest = EngineManifest.read(folder)
    try:
        backend = get_backend(manifest.backend)
    except QandcError as e:
        raise QandcError(f"{folder / MANIFEST}: {e}") from None
    return manifest, backend.load(folder, manifest, compile)
