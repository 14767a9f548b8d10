"""The manifests of an export folder and of an engine folder: one typed object each, one writer, one reader that
checks every field, the checksums of the files listed and the lineage asked for.

Shared fields: the model config, the cache plan, the engine graphs' declarations (every graph of the plan: `full`,
`reuse`, `reuse1`, ...; each with its reuse / emit sets, forecast order and factor dtype, and the tensors they give),
the sampler defaults, the recipe the graphs were quantized with ({"preset", "sha256"}, or None), the VC table (steps x
channels, or None), `lineage` (the input artifacts by kind — "checkpoint", "recipe", "export" — each a reference
{"path" relative to the manifest's folder, "sha256"}, `lineage.py`), the files with their sha256 (plain names, inside
the folder), and library versions. The model config (heads included) is what loading the checkpoint needs besides
its weights. A manifest is written last, in a staging folder swapped in whole for the old one (`qandc.staging`): a
folder holds one only while its files are whole.

Reading with `verify` checks the files and the small inputs present at their recorded paths (recipe, export); the
checkpoint is verified when it is opened (`checkpoint_model`).

The graph declarations are also how the runtime carries the cache between steps: a graph takes the factors of the
branches it reuses and the previous factors of those it emits (with the Taylor weights when the plan forecasts) and
returns the refreshed factors of those it emits, all by tensor name, so the runtime keeps the last tensor of each name
and feeds it to whichever graph runs next. On read, the declared graphs must be those the plan gives. In an ONNX file
(and the engines built from it) an input named like an output takes the suffix `.previous` (`onnx_input_names`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import is_a, read_json, sha256_file, write_json
from ..errors import QandcError
from ..model.dit import DiTConfig, branch_names
from ..model.graphs import GraphSpec, engine_graphs
from ..sampling import CachePlan, SamplerDefaults
from .lineage import check_recipe_checkpoint, confined, is_reference, plain_name, rebase, reference, verify
from .recipe import EXPORTABLE, RECIPE, QuantRecipe, load_vc

MANIFEST = "manifest.json"
PREVIOUS = ".previous"  # the ONNX name suffix of an input named like an output (`onnx_input_names`)
CHECKED_INPUTS = ("recipe", "export")  # the inputs `read` verifies when present (small files)
# fields held as typed objects, written as their JSON form
_OBJECTS = {"model": DiTConfig, "plan": CachePlan, "sampler": SamplerDefaults}


@dataclass
class Manifest:
    KIND: ClassVar[str]
    FORMAT: ClassVar[int] = 3

    model: DiTConfig
    plan: CachePlan
    graphs: dict[str, GraphSpec]
    sampler: SamplerDefaults
    recipe: dict | None
    vc: list | None
    lineage: dict
    files: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def vc_table(self) -> torch.Tensor | None:
        return None if self.vc is None else torch.tensor(self.vc, dtype=torch.float32)

    def to_dict(self) -> dict:
        data = {"kind": self.KIND, "format_version": self.FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "graphs":
                value = {name: spec.to_dict() for name, spec in value.items()}
            elif f.name in _OBJECTS:
                value = value.to_dict()
            data[f.name] = value
        return data

    def write(self, folder: str | Path, files: list[str]) -> None:
        """Checksum `files` (names in `folder`) into the manifest and write it, atomically and last."""
        folder = Path(folder)
        self.files = {name: sha256_file(folder / name) for name in files}
        write_json(folder / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, folder: str | Path, verify: bool = True, lineage: dict | None = None):
        """The manifest of `folder`, every field checked; `verify`: every file's checksum and the inputs of
        CHECKED_INPUTS present at their recorded paths too; `lineage`: the sha256 each named input must have (one
        line naming the manifest when not)."""
        folder = Path(folder)
        path = folder / MANIFEST
        data = read_json(path, f"missing: {folder} is no qandc {cls.KIND} folder (no {MANIFEST})")
        if data.get("kind") != cls.KIND or data.get("format_version") != cls.FORMAT:
            raise QandcError(f"{path}: manifest kind {data.get('kind')!r}, format {data.get('format_version')!r}; "
                             f"expected {cls.KIND!r} format {cls.FORMAT}")
        try:
            manifest = cls._parse(data)
        except (QandcError, TypeError, ValueError, KeyError) as e:
            raise QandcError(f"{path}: {e}") from None
        if verify:
            manifest.verify(folder)
        for kind, digest in (lineage or {}).items():
            recorded = manifest.lineage.get(kind, {}).get("sha256")
            if recorded != digest:
                raise QandcError(f"{path}: made from another {kind} (sha256 {str(recorded)[:12]}, expected "
                                 f"{str(digest)[:12]})")
        return manifest

    @classmethod
    def _parse(cls, data: dict):
        hints = typing.get_type_hints(cls)
        if not isinstance(data.get("files"), dict):
            raise QandcError("'files' is not an object of file names and checksums")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise QandcError(f"field {f.name!r} is missing")
            value = data[f.name]
            if f.name == "graphs":
                if not isinstance(value, dict):
                    raise QandcError("field 'graphs' is not an object of graph declarations")
                value = {name: GraphSpec.from_dict(spec) for name, spec in value.items()}
            elif f.name in _OBJECTS:
                if not isinstance(value, dict):
                    raise QandcError(f"field {f.name!r} is missing or of the wrong type")
                try:
                    value = _OBJECTS[f.name].from_dict(value)
                except (QandcError, TypeError, ValueError) as e:
                    raise QandcError(f"{f.name}: {e}") from None
            elif not is_a(value, hints[f.name]):
                raise QandcError(f"field {f.name!r} is missing or of the wrong type")
            values[f.name] = value
        if not all(plain_name(k) and isinstance(v, str) for k, v in values["files"].items()):
            raise QandcError("'files' must map plain file names to sha256 digests")
        bad = [kind for kind, ref in values["lineage"].items() if not is_reference(ref)]
        if bad:
            raise QandcError(f"lineage {bad[0]!r} is not a reference {{path relative to the folder (never absolute), "
                             "sha256}")
        manifest = cls(**values)
        if manifest.graphs != engine_graphs(manifest.plan, branch_names(manifest.model.depth)):
            raise QandcError(f"field 'graphs' ({', '.join(manifest.graphs)}) does not declare the graphs its cache "
                             "plan gives (made before plans reusing every branch cached the trunk? export and build "
                             "again)")
        if manifest.vc is not None and manifest.vc_table.ndim != 2:
            raise QandcError("'vc' is not a steps x channels table")
        manifest._check()
        return manifest

    def _check(self) -> None:
        """Checks of the kind's own fields."""

    def verify(self, folder: str | Path) -> None:
        """Every listed file is there, inside the folder, with its checksum; the inputs of CHECKED_INPUTS present
        at their recorded paths are those it was made from."""
        folder = Path(folder)
        for name, digest in self.files.items():
            path = confined(folder, name)
            if path is None:
                raise QandcError(f"{folder / name}: links outside {folder}; not read")
            if not path.is_file():
                raise QandcError(f"{path}: missing")
            if sha256_file(path) != digest:
                raise QandcError(f"{path}: checksum mismatch (changed or truncated since it was written)")
        for kind in CHECKED_INPUTS:
            if kind in self.lineage:
                verify(self.lineage[kind], folder, folder / MANIFEST, kind, required=False)

    def checkpoint_model(self, folder: str | Path):
        """The float model of the checkpoint this artifact was made from: its sha256 verified, loaded with the
        recorded model config (heads included, so no sidecar is needed)."""
        from ..model import load_checkpoint

        source = Path(folder) / MANIFEST
        if "checkpoint" not in self.lineage:
            raise QandcError(f"{source}: names no checkpoint (made from a model in memory)")
        return load_checkpoint(verify(self.lineage["checkpoint"], Path(folder), source, "checkpoint"),
                               **self.model.to_dict())


@dataclass
class ExportManifest(Manifest):
    """An export folder: an ONNX file per graph (`onnx`), and with a recipe its recipe.json and amax.safetensors
    (what the Inductor backend builds from). `checks`: per graph, node counts and validation results."""

    KIND: ClassVar[str] = "onnx-export"
    onnx: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)

    def _check(self) -> None:
        if set(self.onnx) != set(self.graphs) or any(f not in self.files for f in self.onnx.values()):
            raise QandcError("'onnx' must name a checksummed ONNX file for every graph")
        if self.recipe is not None and not (self.files.get(RECIPE) == self.recipe.get("sha256")
                                            == self.lineage.get("recipe", {}).get("sha256")):
            raise QandcError(f"its {RECIPE} is not the recipe it records as made from")


@dataclass
class EngineManifest(Manifest):
    """An engine folder: the backend, its engine file per graph and what the backend recorded at build time
    (`build`: e.g. a batch profile, the device, compiled batch sizes)."""

    KIND: ClassVar[str] = "engines"
    backend: str = ""
    engines: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)

    def _check(self) -> None:
        if set(self.engines) != set(self.graphs) or any(f not in self.files for f in self.engines.values()):
            raise QandcError("'engines' must name a checksummed engine file for every graph")

    @classmethod
    def from_export(cls, export: ExportManifest, export_dir: Path, out: Path, backend: str, engines: dict,
                    build: dict, versions: dict) -> EngineManifest:
        """The manifest of engines in `out`: everything the export in `export_dir` recorded (its references
        rebased onto `out`), the export itself as lineage, plus the backend's own fields."""
        shared = {f.name: getattr(export, f.name) for f in dataclasses.fields(Manifest)}
        lineage = {kind: rebase(ref, export_dir, out) for kind, ref in export.lineage.items()}
        return cls(**{**shared, "lineage": {**lineage, "export": reference(Path(export_dir) / MANIFEST, out)},
                      "files": {}, "versions": versions}, backend=backend, engines=engines, build=build)


def pipeline_fields(model, plan: CachePlan | None = None, recipe_dir: str | Path | None = None,
                    sampler: SamplerDefaults | None = None, checkpoint: str | Path = "", *,
                    folder: str | Path) -> dict:
    """The fields every manifest shares, for `model` under `plan` (default none) and `sampler`, for an artifact
    in `folder` made from `checkpoint` (lineage); with a recipe, its plan, sampler settings and VC table (a
    different `plan` is an error; a fake-quant-only preset and a recipe calibrated on another checkpoint too)."""
    recipe, vc, lineage = None, None, {}
    if checkpoint:
        lineage["checkpoint"] = reference(checkpoint, folder)
    if recipe_dir is not None:
        recipe_dir = Path(recipe_dir)
        loaded = QuantRecipe.load(recipe_dir)
        if loaded.preset not in EXPORTABLE:
            raise QandcError(f"{recipe_dir}: {loaded.preset} is fake quant only (quality study); engines take "
                             f"{' or '.join(EXPORTABLE)}")
        if plan is not None and plan != loaded.plan:
            raise QandcError(f"the cache plan differs from the recipe's ({loaded.plan.to_dict()}); leave --cache out")
        if checkpoint:
            check_recipe_checkpoint(recipe_dir / RECIPE, loaded.checkpoint_sha256, checkpoint)
        plan, sampler, vc = loaded.plan, loaded.sampler_defaults, load_vc(recipe_dir)
        lineage["recipe"] = reference(recipe_dir / RECIPE, folder)
        recipe = {"preset": loaded.preset, "sha256": lineage["recipe"]["sha256"]}
    plan = plan or CachePlan.none()
    return {"model": model.config, "plan": plan, "graphs": engine_graphs(plan, model.branch_names),
            "sampler": sampler or SamplerDefaults(), "recipe": recipe, "vc": None if vc is None else vc.tolist(),
            "lineage": lineage}


def onnx_input_names(graph: GraphSpec) -> list[str]:
    """The input names of a graph's ONNX file (and of the engines built from it): the declared names, but an input
    named like an output (the previous factors of a branch the graph refreshes) takes the suffix PREVIOUS, as ONNX
    names each tensor once."""
    outputs = set(graph.output_names)
    return [name + PREVIOUS if name in outputs else name for name in graph.input_names]


MANIFESTS = {kind.KIND: kind for kind in (ExportManifest, EngineManifest)}
