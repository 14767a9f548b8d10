"""`build_engines` / `load_engines`: the backends behind one face, with a manifest that carries everything the
runtime needs (model config, cache plan, VC table, recipe id, sampler defaults) and the sha256 of every file,
checked on load."""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__
from ..artifacts import read_json, sha256_file, write_json
from ..errors import QandcError
from . import onnxruntime_backend, tensorrt_backend

BACKENDS = ("onnxruntime", "tensorrt")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
EXPORT_FORMAT = 1
GRAPHS = ("full", "reuse")


def _read_manifest(folder: Path, kind: str, version: int) -> dict:
    path = folder / MANIFEST
    manifest = read_json(path, f"missing: {folder} is no qandc {kind} folder (no {MANIFEST})")
    if manifest.get("kind") != kind or manifest.get("format_version") != version:
        raise QandcError(f"{path}: a {manifest.get('kind')!r} manifest of format {manifest.get('format_version')!r}; "
                         f"expected {kind!r} format {version}")
    return manifest


def _verify(folder: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file():
            raise QandcError(f"{folder / name}: missing")
        if sha256_file(folder / name) != digest:
            raise QandcError(f"{folder / name}: checksum mismatch (changed or truncated since it was written)")


def build_engines(onnx_dir: str | Path, out: str | Path, backend: str, max_batch: int = 64) -> dict:
    """Build the full and reuse engines of an export directory; returns the engine manifest."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    if backend not in BACKENDS:
        raise QandcError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    export = _read_manifest(onnx_dir, "onnx-export", EXPORT_FORMAT)
    _verify(onnx_dir, export)
    out.mkdir(parents=True, exist_ok=True)
    quantized = export["recipe"] is not None
    files = []
    for graph in GRAPHS:
        if backend == "onnxruntime":
            files.append(onnxruntime_backend.build(onnx_dir / f"{graph}.onnx", out, graph))
        else:
            files.append(tensorrt_backend.build(onnx_dir / f"{graph}.onnx", out, graph, quantized, max_batch))
    versions = {"qandc": __version__, "python": platform.python_version()}
    versions["onnxruntime" if backend == "onnxruntime" else "tensorrt"] = _backend_version(backend)
    manifest = {key: export[key] for key in ("model", "guidance", "plan", "cache_inputs", "sampler", "recipe", "vc")}
    manifest.update(format_version=FORMAT_VERSION, kind="engines", backend=backend, max_batch=max_batch,
                    engines={g: f.name for g, f in zip(GRAPHS, files)}, source=str(onnx_dir),
                    source_sha256=sha256_file(onnx_dir / MANIFEST), versions=versions,
                    files={f.name: sha256_file(f) for f in files})
    write_json(out / MANIFEST, manifest)
    return manifest


def load_engines(folder: str | Path) -> tuple[dict, dict]:
    """(manifest, {"full": engine, "reuse": engine}) of an engine directory, every checksum verified."""
    folder = Path(folder)
    manifest = _read_manifest(folder, "engines", FORMAT_VERSION)
    _verify(folder, manifest)
    engine = onnxruntime_backend.OrtEngine if manifest["backend"] == "onnxruntime" else tensorrt_backend.TrtEngine
    return manifest, {graph: engine(folder / manifest["engines"][graph]) for graph in GRAPHS}


def _backend_version(backend: str) -> str:
    module = onnxruntime_backend._ort() if backend == "onnxruntime" else tensorrt_backend._trt()
    return module.__version__
