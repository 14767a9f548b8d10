"""Engines from an ONNX export: ONNX Runtime built and run here; TensorRT where it imports (skipped here)."""

import json

import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.artifacts import sha256_file
from qandc.errors import QandcError
from qandc.sampling import CachePlan

pytest.importorskip("onnxruntime")

from qandc.engines import build_engines, load_engines  # noqa: E402
from qandc.exporter import export  # noqa: E402

PLAN = CachePlan.interval(2, "attn")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(guidance="all")
    folder = tmp_path_factory.mktemp("onnx")
    export(model, folder, PLAN)
    return model, folder


def _feeds(x, t, y):
    return {"x": x, "t": t, "y": y}


def test_onnxruntime_engines_run_both_graphs(exported, tmp_path):
    model, folder = exported
    manifest = build_engines(folder, tmp_path, "onnxruntime")
    assert manifest.plan == PLAN and manifest.backend == "onnxruntime"
    assert set(manifest.files) == {"full.ort.onnx", "reuse.ort.onnx"}
    loaded, engines = load_engines(tmp_path)
    assert loaded == manifest
    full_graph, reuse_graph = manifest.graphs["full"], manifest.graphs["reuse"]
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 250, 500, 999]), torch.tensor([0, 1, 2, 10])
    full = engines["full"].infer(_feeds(x, t, y))
    with torch.no_grad():
        expected = model.forward_graph(full_graph, _feeds(x, t, y))
    assert full_graph.output_names == ["out", "blocks.0.attn", "blocks.1.attn"]
    assert all(rel_err(full[n], expected[n]) < 1e-5 for n in full_graph.output_names)
    cache = {n: full[n] for n in reuse_graph.cache_inputs}
    reuse = engines["reuse"].infer({**_feeds(x, t // 3, y), **cache})
    with torch.no_grad():
        expected = model.forward_graph(reuse_graph, {**_feeds(x, t // 3, y), **cache})
    assert rel_err(reuse["out"], expected["out"]) < 1e-5
    with pytest.raises(QandcError, match="inputs missing"):
        engines["reuse"].infer(_feeds(x, t, y))
    with pytest.raises(QandcError, match="x is torch.float64, not torch.float32"):
        engines["full"].infer(_feeds(x.double(), t, y))


def test_tampered_truncated_or_foreign_engines_are_refused(exported, tmp_path):
    _, folder = exported
    build_engines(folder, tmp_path, "onnxruntime")
    engine = tmp_path / "reuse.ort.onnx"
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(QandcError, match="checksum mismatch"):
        load_engines(tmp_path)
    engine.write_bytes(data)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 7}))
    with pytest.raises(QandcError, match="format 7"):
        load_engines(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    engine.unlink()
    with pytest.raises(QandcError, match="missing"):
        load_engines(tmp_path)
    with pytest.raises(QandcError, match="no manifest.json"):
        build_engines(tmp_path / "nowhere", tmp_path / "x", "onnxruntime")


def test_build_engine_cli(exported, tmp_path):
    from qandc.cli import main
    _, folder = exported
    assert main(["build-engine", "--backend", "onnxruntime", "--onnx", str(folder), "--out", str(tmp_path)]) == 0
    assert load_engines(tmp_path)[0].lineage["export"]["sha256"] == sha256_file(folder / "manifest.json")


def test_tensorrt_engines(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable in this environment (see environment.md); "
                                           "the tensorrt backend is written against its API but was not run here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    model, folder = exported
    manifest = build_engines(folder, tmp_path, "tensorrt", max_batch=8)
    _, engines = load_engines(tmp_path)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 250, 500, 999]), torch.tensor([0, 1, 2, 10])
    full = engines["full"].infer(_feeds(x, t, y))
    with torch.no_grad():
        expected = model.forward_graph(manifest.graphs["full"], _feeds(x, t, y))["out"]
    assert rel_err(full["out"].float(), expected) < 2e-2  # bf16 builder flag on a float graph
