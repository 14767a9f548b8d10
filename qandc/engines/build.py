"""`build_engines` / `load_engines`: the backends behind one face, with a manifest that carries everything the
runtime needs (model config, cache plan, VC table, recipe id, sampler defaults) and the sha256 of every file,
checked on load. ONNX Runtime and TensorRT build from the ONNX graphs of an export; Inductor builds from the
checkpoint and recipe the export names (or, through `build_inductor`, from a model in memory)."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import read_json, sha256_file, write_json
from ..errors import QandcError
from . import inductor_backend, onnxruntime_backend, tensorrt_backend

BACKENDS = ("onnxruntime", "tensorrt", "inductor")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
EXPORT_FORMAT = 1
GRAPHS = ("full", "reuse")


# what the readers of each manifest kind use, with its JSON type
FIELDS = {"model": dict, "guidance": str, "plan": dict, "cache_inputs": list, "sampler": dict,
          "recipe": (dict, type(None)), "vc": (list, type(None)), "files": dict}
KIND_FIELDS = {"onnx-export": {"checkpoint": str}, "engines": {"backend": str, "engines": dict,
                                                               "max_batch": (int, type(None))}}


def _read_manifest(folder: Path, kind: str, version: int) -> dict:
    """A manifest of `kind`, its fields checked: every problem is one line naming the file."""
    from ..model.dit import DiTConfig, branch_names
    from ..sampling import CachePlan

    path = folder / MANIFEST
    manifest = read_json(path, f"missing: {folder} is no qandc {kind} folder (no {MANIFEST})")
    if manifest.get("kind") != kind or manifest.get("format_version") != version:
        raise QandcError(f"{path}: manifest kind {manifest.get('kind')!r}, format {manifest.get('format_version')!r}; "
                         f"expected {kind!r} format {version}")
    for key, types in {**FIELDS, **KIND_FIELDS[kind]}.items():
        if not isinstance(manifest.get(key), types) or isinstance(manifest.get(key), bool):
            raise QandcError(f"{path}: field {key!r} is missing or of the wrong type")
    if not all(isinstance(k, str) and isinstance(v, str) and Path(k).name == k and "\0" not in k
               for k, v in manifest["files"].items()):
        raise QandcError(f"{path}: 'files' must map plain file names to sha256 digests")
    try:
        DiTConfig.from_dict(manifest["model"])
    except (QandcError, TypeError, ValueError) as e:
        raise QandcError(f"{path}: model config: {e}") from None
    try:
        CachePlan.from_dict(manifest["plan"]).reuse_set(branch_names(manifest["model"]["depth"]))
        if manifest["vc"] is not None and torch.tensor(manifest["vc"], dtype=torch.float32).ndim != 2:
            raise QandcError("'vc' is not a steps x channels table")
    except (QandcError, TypeError, ValueError) as e:
        raise QandcError(f"{path}: {e}") from None
    if kind == "engines":
        if manifest["backend"] not in BACKENDS:
            raise QandcError(f"{path}: unknown backend {manifest['backend']!r}")
        if any(manifest["engines"].get(g) not in manifest["files"] for g in GRAPHS):
            raise QandcError(f"{path}: 'engines' must name a checksummed full and reuse engine")
    return manifest


def _verify(folder: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file():
            raise QandcError(f"{folder / name}: missing")
        if sha256_file(folder / name) != digest:
            raise QandcError(f"{folder / name}: checksum mismatch (changed or truncated since it was written)")


def build_engines(onnx_dir: str | Path, out: str | Path, backend: str, max_batch: int = 64,
                  batch_sizes: list[int] = ()) -> dict:
    """Build the full and reuse engines of an export directory; returns the engine manifest. `batch_sizes`: the
    row counts Inductor compiles for at build time (others compile on first use)."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    if backend not in BACKENDS:
        raise QandcError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    export = _read_manifest(onnx_dir, "onnx-export", EXPORT_FORMAT)
    _verify(onnx_dir, export)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder being rebuilt has no manifest until it is whole again
    created = not out.exists()
    try:
        if backend == "inductor":
            return _inductor_from_export(onnx_dir, export, out, batch_sizes)
        return _onnx_engines(onnx_dir, export, out, backend, max_batch)
    except BaseException:
        if created:  # a failed build leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _onnx_engines(onnx_dir: Path, export: dict, out: Path, backend: str, max_batch: int) -> dict:
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
    manifest = {key: export[key] for key in ("model", "guidance", "plan", "cache_inputs", "sampler", "recipe", "vc",
                                             "checkpoint")}
    manifest.update(format_version=FORMAT_VERSION, kind="engines", backend=backend, max_batch=max_batch,
                    engines={g: f.name for g, f in zip(GRAPHS, files)}, source=str(onnx_dir),
                    source_sha256=sha256_file(onnx_dir / MANIFEST), versions=versions,
                    files={f.name: sha256_file(f) for f in files})
    write_json(out / MANIFEST, manifest)
    return manifest


def build_inductor(model, out: str | Path, plan=None, recipe_dir: str | Path | None = None,
                   sampler: dict | None = None, batch_sizes: list[int] = (), source: dict | None = None,
                   checkpoint: str = "") -> dict:
    """Inductor engines of a float32 `model` (on the device they are for): bf16, the recipe's layers as FP8 / INT8
    kernels, its plan, sampler settings and VC table; without a recipe, `plan` (default none) and `sampler`."""
    from ..calibration.quantize import QuantRecipe, load_vc
    from ..sampling import CachePlan
    from .quantized import quantize_for_inference

    out = Path(out)
    recipe_info, vc = None, None
    if recipe_dir is not None:
        recipe = QuantRecipe.load(recipe_dir)
        plan, vc = recipe.cache_plan, load_vc(recipe_dir)
        sampler = {"steps": recipe.steps, "sampler": recipe.sampler, "cfg_scale": recipe.cfg_scale}
        recipe_info = {"path": str(recipe_dir), "preset": recipe.preset,
                       "sha256": sha256_file(Path(recipe_dir) / "recipe.json")}
    plan = plan or CachePlan.none()
    branches = plan.reuse_set(model.branch_names)
    engine_model = quantize_for_inference(model, recipe_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    files = inductor_backend.build(engine_model, out, branches, plan.regate, list(batch_sizes))
    manifest = {"model": model.config.to_dict(), "guidance": model.config.guidance, "plan": plan.to_dict(),
                "cache_inputs": branches, "sampler": sampler or {"steps": 50, "sampler": "ddpm", "cfg_scale": 1.5},
                "recipe": recipe_info, "vc": None if vc is None else vc.tolist(), "checkpoint": checkpoint,
                "format_version": FORMAT_VERSION, "kind": "engines", "backend": "inductor", "max_batch": None,
                "engines": {g: f"{g}{inductor_backend.SUFFIX}" for g in GRAPHS}, "device": model.device.type,
                "compiled_batch_sizes": list(batch_sizes) if model.device.type == "cuda" else [],
                "compile_cache": inductor_backend.CACHE if model.device.type == "cuda" else None,
                **(source or {"source": None, "source_sha256": None}),
                "versions": {"qandc": __version__, "python": platform.python_version(), "torch": torch.__version__},
                "files": {f.name: sha256_file(f) for f in files}}
    write_json(out / MANIFEST, manifest)
    return manifest


def _inductor_from_export(onnx_dir: Path, export: dict, out: Path, batch_sizes) -> dict:
    from ..model import load_checkpoint
    from ..sampling import CachePlan

    if not export.get("checkpoint"):
        raise QandcError(f"{onnx_dir / MANIFEST}: names no checkpoint; the inductor backend builds from it")
    model = load_checkpoint(export["checkpoint"]).to("cuda" if torch.cuda.is_available() else "cpu")
    recipe = export["recipe"]["path"] if export["recipe"] else None
    source = {"source": str(onnx_dir), "source_sha256": sha256_file(onnx_dir / MANIFEST)}
    return build_inductor(model, out, CachePlan.from_dict(export["plan"]), recipe, export["sampler"], batch_sizes,
                          source, export["checkpoint"])


def load_engines(folder: str | Path, compile: bool = True) -> tuple[dict, dict]:
    """(manifest, {"full": engine, "reuse": engine}) of an engine directory, every checksum verified. `compile`:
    Inductor engines on a GPU run compiled (from the saved compile cache); False runs them eagerly."""
    folder = Path(folder)
    manifest = _read_manifest(folder, "engines", FORMAT_VERSION)
    _verify(folder, manifest)
    if manifest["backend"] == "inductor":
        if manifest["device"] == "cuda" and not torch.cuda.is_available():
            raise QandcError(f"{folder}: Inductor engines built for a GPU; this machine has none")
        if manifest["compile_cache"]:
            inductor_backend.load_compile_cache(folder / manifest["compile_cache"])
        compiled = compile and manifest["device"] == "cuda"
        quantized = manifest["recipe"] is not None
        return manifest, {g: inductor_backend.InductorEngine(folder / manifest["engines"][g], g,
                                                             manifest["cache_inputs"], compiled, quantized)
                          for g in GRAPHS}
    engine = onnxruntime_backend.OrtEngine if manifest["backend"] == "onnxruntime" else tensorrt_backend.TrtEngine
    return manifest, {graph: engine(folder / manifest["engines"][graph]) for graph in GRAPHS}


def _backend_version(backend: str) -> str:
    module = onnxruntime_backend._ort() if backend == "onnxruntime" else tensorrt_backend._trt()
    return module.__version__
