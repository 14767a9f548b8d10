"""ONNX export of the full and reuse graphs: float and Q/DQ (INT8, FP8 rewritten to standard ops), checked by
ONNX Runtime against PyTorch (float: rel 1e-5; fake quant: rel 1e-4, the same scales and rounding), run as the
ONNX Runtime engines run them (INT8 Q/DQ as uint8, `ort_int8.session`)."""

import copy

import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.artifacts import sha256_file
from qandc.errors import QandcError
from qandc.ort_int8 import session
from qandc.sampling import CachePlan

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import CalibrationSettings, SelectorParams, apply_recipe, calibrate  # noqa: E402
from qandc.exporter import export  # noqa: E402
from qandc.formats.manifest import MANIFEST, ExportManifest  # noqa: E402

PLAN = CachePlan.interval(3, "mlp")


@pytest.fixture(scope="module")
def model():
    return tiny_model(guidance="all")


def _recipe(model, folder, preset):
    settings = CalibrationSettings(preset=preset, selector="random", budget=20, plan=PLAN, pool_samples=4, steps=6,
                                   selector_params=SelectorParams(k=4), vc="var", vc_samples=4, batch_size=4)
    calibrate(model, folder, settings)
    return folder


def _check_against_torch(folder, reference, tolerance):
    manifest = ExportManifest.read(folder)
    full_graph, reuse_graph = manifest.graphs["full"], manifest.graphs["reuse"]
    branches = full_graph.cache_outputs
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 999]), torch.tensor([0, 3, 10])  # batch 3: dynamic
    full = session(folder / "full.onnx")
    assert [i.name for i in full.get_inputs()] == ["x", "t", "y"]
    assert [o.name for o in full.get_outputs()] == ["out", *branches]
    outs = full.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    with torch.no_grad():
        expected = reference.forward_graph(full_graph, {"x": x, "t": t, "y": y})
    for name, value in zip(full_graph.output_names, outs):
        assert rel_err(torch.from_numpy(value), expected[name]) < tolerance
    reuse = session(folder / "reuse.onnx")
    x2, t2 = x + 0.1, t // 2  # a later step, reusing the cache of the full step
    cache = {k: torch.from_numpy(v) for k, v in zip(branches, outs[1:]) if k in reuse_graph.cache_inputs}
    feeds = {"x": x2, "t": t2, "y": y, **cache}
    with torch.no_grad():
        expected = reference.forward_graph(reuse_graph, feeds)["out"]
    got = reuse.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert rel_err(torch.from_numpy(got), expected) < tolerance
    return manifest


def test_float_export_matches_pytorch(model, tmp_path):
    export(model, tmp_path, PLAN)
    manifest = _check_against_torch(tmp_path, model, 1e-5)
    assert manifest.graphs["reuse"].cache_inputs == ["blocks.0.mlp", "blocks.1.mlp"] and manifest.recipe is None
    assert manifest.checks["full"]["quantize_linear"] == 0
    assert all(g["polygraphy_onnxrt_rel_error"] < 1e-5 for g in manifest.checks.values())
    for name, digest in manifest.files.items():
        assert sha256_file(tmp_path / name) == digest


def test_export_of_a_dit_with_per_block_embedders(tmp_path):
    model = tiny_model(guidance="all", block_embedders=True)
    export(model, tmp_path, PLAN)
    _check_against_torch(tmp_path, model, 1e-5)


@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-fp8"])
def test_qdq_export_matches_fake_quant(model, tmp_path, preset):
    recipe_dir = _recipe(model, tmp_path / "recipe", preset)
    export(model, tmp_path / "onnx", recipe_dir=recipe_dir)
    fake_quant, recipe = apply_recipe(copy.deepcopy(model), recipe_dir)
    manifest = _check_against_torch(tmp_path / "onnx", fake_quant, 1e-4)
    graph = onnx.load(str(tmp_path / "onnx" / "full.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)  # no TensorRT-only ops
    assert manifest.checks["full"]["quantize_linear"] == 2 * len(recipe.layers)
    assert all(g["polygraphy_onnxrt_rel_error"] < 1e-4 for g in manifest.checks.values())
    assert manifest.recipe["preset"] == preset and len(manifest.vc) == 6
    zero_points = {i.data_type for i in graph.graph.initializer if i.name == "qandc_fp8_zero_point"}
    assert zero_points == ({onnx.TensorProto.FLOAT8E4M3FN} if preset == "w8a8-fp8" else set())
    if preset == "w8a8-int8":  # the export stays int8 symmetric (TensorRT); only what ONNX Runtime runs is uint8
        constants = {n.output[0]: n.attribute[0].t.data_type for n in graph.graph.node if n.op_type == "Constant"}
        assert {constants[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"} == {
            onnx.TensorProto.INT8}


def test_export_refuses_w4a8_and_a_foreign_plan(model, tmp_path):
    w4 = _recipe(model, tmp_path / "w4", "w4a8")
    with pytest.raises(QandcError, match="fake quant only"):
        export(model, tmp_path / "a", recipe_dir=w4)
    int8 = _recipe(model, tmp_path / "int8", "w8a8-int8")
    with pytest.raises(QandcError, match="differs from the recipe"):
        export(model, tmp_path / "b", CachePlan.interval(2), recipe_dir=int8)


def test_export_cli(tmp_path):
    from qandc.cli import main
    from qandc.model import save_checkpoint
    save_checkpoint(tiny_model(), tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--cache", "interval=2", "--out",
                 str(tmp_path / "o")]) == 0
    assert {"full.onnx", "reuse.onnx", MANIFEST} <= {p.name for p in (tmp_path / "o").iterdir()}
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--recipe", str(tmp_path / "none"), "--out",
                 str(tmp_path / "p")]) == 2
