"""A backend is one class plus one `register` call: a backend defined here, in the test alone, is built by
`build_engines`, offered by the CLI, loaded by `load_engines` and driven by the runtime, with its capabilities
(a batch profile) honoured — no other file knows it."""

import pytest
import torch

from conftest import tiny_model
from qandc.artifacts import atomic_path, read_json, sha256_file, write_json
from qandc.engines import Backend, BuildResult, Capabilities, build_engines, load_engines, register
from qandc.errors import QandcError
from qandc.model import load_checkpoint, save_checkpoint
from qandc.model.graphs import PathGraph
from qandc.runtime import Pipeline
from qandc.sampling import CachePlan, sample

pytest.importorskip("onnx")

from qandc.exporter import export  # noqa: E402

PLAN = CachePlan.interval(2, "mlp")


class EagerEngine:
    """One graph run eagerly by the float model of the export's checkpoint."""

    def __init__(self, model, spec):
        self.graph, self.input_names, self.output_names = PathGraph(model, spec), spec.input_names, spec.output_names
        self.device = model.device

    def infer(self, feeds):
        with torch.no_grad():
            return dict(zip(self.output_names, self.graph(*[feeds[n] for n in self.input_names])))


class EagerBackend(Backend):
    name = "eager-test"
    capabilities = Capabilities(devices=("cpu",), precisions=("float",), batch_profile=True)

    def versions(self):
        return {"torch": torch.__version__}

    def build(self, export_dir, export, out, options):
        engines = {}
        for name, spec in export.graphs.items():
            write_json(out / f"{name}.eager.json", {"graph": spec.to_dict()})
            engines[name] = f"{name}.eager.json"
        return BuildResult(engines, list(engines.values()), {"max_batch": options.max_batch})

    def load(self, folder, manifest, compile=True):
        model = manifest.checkpoint_model(folder)
        for name, file in manifest.engines.items():
            assert read_json(folder / file)["graph"] == manifest.graphs[name].to_dict()
        return {name: EagerEngine(model, manifest.graphs[name]) for name in manifest.engines}


register(EagerBackend())


def test_a_registered_backend_runs_through_build_load_and_the_runtime(tmp_path):
    from qandc.cli import main

    model = tiny_model(guidance="all")
    save_checkpoint(model, tmp_path / "tiny.pt", {})
    export(model, tmp_path / "onnx", PLAN, checkpoint=tmp_path / "tiny.pt")
    assert main(["build-engine", "--backend", "eager-test", "--onnx", str(tmp_path / "onnx"), "--max-batch", "4",
                 "--out", str(tmp_path / "engines")]) == 0
    manifest, engines = load_engines(tmp_path / "engines")
    assert manifest.backend == "eager-test" and set(engines) == {"full", "reuse"}
    pipeline = Pipeline.load(tmp_path / "engines")
    got = pipeline.generate([1, 2], seed=3, steps=6, sampler="ddpm", cfg_scale=1.5)
    expected = sample(load_checkpoint(tmp_path / "tiny.pt"), [1, 2], 6, "ddpm", 1.5, seed=3, plan=PLAN)
    assert torch.equal(got, expected)
    assert pipeline.last_run["full"] == 3 and pipeline.last_run["reuse"] == 3
    with pytest.raises(QandcError, match="exceeds the engines' profile of 4"):
        pipeline.generate([1, 2, 3], seed=3, steps=6)  # 6 rows with guidance: the declared batch profile holds


def test_a_backend_refuses_an_export_of_a_precision_it_does_not_build(tmp_path):
    model = tiny_model(guidance="all")
    save_checkpoint(model, tmp_path / "tiny.pt", {})
    export(model, tmp_path / "onnx", PLAN, checkpoint=tmp_path / "tiny.pt")
    (tmp_path / "onnx" / "recipe.json").write_text("{}")
    sha = sha256_file(tmp_path / "onnx" / "recipe.json")
    with atomic_path(tmp_path / "onnx" / "manifest.json") as tmp:  # an export claiming a recipe, consistently
        data = read_json(tmp_path / "onnx" / "manifest.json")
        write_json(tmp, {**data, "recipe": {"preset": "w8a8-int8", "sha256": sha}, "files": {
            **data["files"], "recipe.json": sha}, "lineage": {**data["lineage"], "recipe": {"path": "recipe.json",
                                                                                          "sha256": sha}}})
    with pytest.raises(QandcError, match="the eager-test backend builds float engines, not w8a8-int8"):
        build_engines(tmp_path / "onnx", tmp_path / "engines", "eager-test")
    assert not (tmp_path / "engines").exists()
