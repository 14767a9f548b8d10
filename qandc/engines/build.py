"""`build_engines` / `load_engines`: any registered backend behind one face, with a manifest that carries
everything the runtime needs (model config, cache plan, graph declarations, VC table, recipe, sampler defaults,
lineage) and the sha256 of every file, checked on load."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from .. import __version__
from ..artifacts import sha256_file
from ..errors import QandcError
from ..formats.manifest import MANIFEST, EngineManifest, ExportManifest
from ..locking import LOCK, holds_output
from .backend import BuildOptions, Engine, get_backend


@holds_output("build-engine")
def build_engines(onnx_dir: str | Path, out: str | Path, backend: str, max_batch: int = 64,
                  batch_sizes: list[int] = ()) -> EngineManifest:
    """Build the engines of every graph of an export directory with `backend`; returns the engine manifest.
    `max_batch`: a batch profile's largest batch; `batch_sizes`: row counts to compile for at build time."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    chosen = get_backend(backend)
    export = ExportManifest.read(onnx_dir)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder being rebuilt has no manifest until it is whole again
    created = all(p.name == LOCK for p in out.iterdir())  # made for this build (the lock made the folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        result = chosen.build(onnx_dir, export, out, BuildOptions(max_batch, tuple(batch_sizes)))
        versions = {"qandc": __version__, "python": platform.python_version(), **chosen.versions()}
        manifest = EngineManifest.from_export(export, sha256_file(onnx_dir / MANIFEST), chosen.name, result.engines,
                                              result.record, versions)
        manifest.write(out, result.files)
        return manifest
    except BaseException:
        if created:  # a failed build leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


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
