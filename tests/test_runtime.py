"""The runtime: ONNX Runtime engines driven by the one sampler, against the PyTorch fake-quant pipeline."""

import copy
import dataclasses
import json

import numpy as np
import torch
import pytest

from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.sampling import CachePlan, sample

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import CalibrationSettings, SelectorParams, apply_recipe, calibrate  # noqa: E402
from qandc.formats.recipe import VarianceCompensation, load_vc  # noqa: E402
from qandc.engines import build_engines  # noqa: E402
from qandc.exporter import export  # noqa: E402
from qandc.runtime import Pipeline  # noqa: E402

PLAN = CachePlan.interval(3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_model(guidance="all")
    root = tmp_path_factory.mktemp("pipeline")
    settings = CalibrationSettings(preset="w8a8-int8", selector="random", budget=20, plan=PLAN, pool_samples=4,
                                   steps=8, selector_params=SelectorParams(k=4), vc="var", vc_samples=4, batch_size=4)
    calibrate(model, root / "recipe", settings)
    export(model, root / "onnx", recipe_dir=root / "recipe")
    build_engines(root / "onnx", root / "engines", "onnxruntime")
    return model, root


def test_engine_pipeline_matches_fake_quant_pipeline(built):
    model, root = built
    pipeline = Pipeline.load(root / "engines")
    got = pipeline.generate([1, 2, 3], seed=5)
    assert pipeline.denoiser.calls == {"full": 3, "reuse": 5}  # 8 steps, interval 3: the cache fires
    fake_quant, recipe = apply_recipe(copy.deepcopy(model), root / "recipe")
    expected = sample(fake_quant, [1, 2, 3], 8, "ddpm", 1.5, seed=5, plan=PLAN,
                      correction=VarianceCompensation(load_vc(root / "recipe")))
    error = rel_err(got, expected)
    assert error < 1e-4
    assert rel_err(pipeline.generate([1, 2, 3], seed=5, use_vc=False), expected) > 3 * error  # VC really applied


def test_engine_pipeline_refuses_a_vc_table_of_another_length(built):
    _, root = built
    with pytest.raises(QandcError, match="VC table has 8 steps"):
        Pipeline.load(root / "engines").generate([1], seed=0, steps=10)


def test_generate_with_engines(built, tmp_path):
    from qandc.cli import main
    _, root = built
    assert main(["generate", "--engines", str(root / "engines"), "--labels", "1,2", "--steps", "8", "--seed", "5",
                 "--out", str(tmp_path / "g")]) == 0
    samples = np.load(tmp_path / "g" / "samples.npz")["samples"]
    direct = Pipeline.load(root / "engines").generate([1, 2], seed=5).numpy()
    assert np.allclose(samples, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    caption = json.loads((tmp_path / "g" / "config.json").read_text())["caption"]
    assert caption.startswith(PLAN.describe()) and "w8a8-int8 (onnxruntime engines) + VC" in caption
    assert main(["generate", "--engines", str(root / "engines"), "--recipe", str(root / "recipe"), "--out",
                 str(tmp_path / "h")]) == 2
    assert main(["generate", "--engines", str(root / "engines"), "--labels", "1,2", "--steps", "8", "--seed", "5",
                 "--run-graphs", "--out", str(tmp_path / "r")]) == 0  # whole-run graphs: the same samples
    assert np.array_equal(np.load(tmp_path / "r" / "samples.npz")["samples"], samples)
    assert [json.loads((tmp_path / d / "config.json").read_text())["whole_run_graphs"] for d in "gr"] == [False, True]
    assert main(["generate", "--engines", str(root / "engines"), "--labels", "1", "--run-graphs", "--nan-fallback",
                 "--out", str(tmp_path / "f")]) == 2


def test_generate_takes_the_sampler_settings_and_model_config_of_its_artifact(tmp_path, capsys):
    """A recipe made for DDIM-5 at guidance 3 from a state dict that cannot tell its heads: generate --recipe and
    --engines sample as it was made (no --steps, --sampler, --cfg-scale, --num-heads or sidecar given); a --steps
    the VC table does not hold is a one-line error."""
    import json
    from qandc.cli import main

    model = tiny_model(guidance="all", freq_shift=1)  # hidden 32: no named config gives its heads
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    settings = CalibrationSettings(preset="w8a8-int8", selector="random", budget=10, plan=PLAN, pool_samples=2,
                                   steps=5, sampler="ddim", cfg_scale=3.0, selector_params=SelectorParams(k=4),
                                   vc="var", vc_samples=2, batch_size=4)
    calibrate(model, tmp_path / "recipe", settings, checkpoint=tmp_path / "plain.pt")
    export(model, tmp_path / "onnx", recipe_dir=tmp_path / "recipe")
    build_engines(tmp_path / "onnx", tmp_path / "engines", "onnxruntime")
    fake_quant, _ = apply_recipe(copy.deepcopy(model), tmp_path / "recipe")
    expected = sample(fake_quant, [1, 2], 5, "ddim", 3.0, seed=4, plan=PLAN,
                      correction=VarianceCompensation(load_vc(tmp_path / "recipe"))).numpy()
    sources = {"recipe": ["--checkpoint", str(tmp_path / "plain.pt"), "--recipe", str(tmp_path / "recipe")],
               "engines": ["--engines", str(tmp_path / "engines")]}
    for name, source in sources.items():
        out = tmp_path / f"samples-{name}"
        assert main(["generate", *source, "--labels", "1,2", "--seed", "4", "--out", str(out)]) == 0
        samples = np.load(out / "samples.npz")["samples"]
        assert np.allclose(samples, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()), name
        config = json.loads((out / "config.json").read_text())
        assert (config["steps"], config["sampler"], config["cfg_scale"]) == (5, "ddim", 3.0)
        capsys.readouterr()
        assert main(["generate", *source, "--steps", "6", "--out", str(out) + "-6"]) == 2
        error = capsys.readouterr().err.strip()
        assert "VC table has 5 steps, sampling uses 6" in error and len(error.splitlines()) == 1
    # from Python, as diffusers users load a pipeline: the recipe's fake quant, plan, VC and sampler settings
    from qandc.runtime import QandcDiTPipeline

    pipe = QandcDiTPipeline.from_pretrained(tmp_path / "plain.pt", recipe=tmp_path / "recipe")
    got = pipe.pipeline.generate([1, 2], seed=4).numpy()
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(QandcError, match="a recipe carries its own cache plan"):
        QandcDiTPipeline.from_pretrained(tmp_path / "plain.pt", cache="interval=2", recipe=tmp_path / "recipe")


def test_qandc_run_end_to_end_and_resumes(tmp_path, capsys):
    """`qandc run` with the default plan: searched on the model, recorded in the recipe, deployed by the engines."""
    import json

    from qandc.calibration.plan_search import parse_auto
    from qandc.cli import main
    from qandc.model import save_checkpoint
    from qandc.sampling.plan import DEFAULT_PLAN_SEARCH
    save_checkpoint(tiny_model(guidance="all", in_channels=4, pixel_shuffle=2, image_crop=28, input_size=16),
                    tmp_path / "m.pt")
    args = ["run", "--checkpoint", str(tmp_path / "m.pt"), "--preset", "w8a8-int8", "--selector", "uniform",
            "--samples", "16", "--pool-samples", "4", "--steps", "6", "--clusters", "4", "--vc-samples", "4",
            "--batch-size", "4", "--labels", "0,1", "--per-class", "2", "--out", str(tmp_path / "run")]
    classifier = pytest.importorskip("qandc.metrics.classifier")
    if not (classifier.ASSETS / classifier.WEIGHTS).exists():
        pytest.skip("the shipped classifier is missing")
    assert main(args) == 0
    run = tmp_path / "run"
    for stage in ("recipe/recipe.json", "onnx/manifest.json", "engines/manifest.json", "samples/samples.npz",
                  "eval.json"):
        assert (run / stage).exists(), stage
    search = json.loads((run / "recipe" / "plan.json").read_text())
    assert search["spec"] == parse_auto(DEFAULT_PLAN_SEARCH).spec
    recipe, engines = (json.loads((run / p).read_text()) for p in ("recipe/recipe.json", "engines/manifest.json"))
    assert recipe["plan_search"] == search["spec"] and recipe["plan"] == engines["plan"] == search["plan"]
    full = CachePlan.from_dict(search["plan"]).full_steps(6).count(True)
    assert f"{full} full steps, {6 - full} reuse steps" in capsys.readouterr().err
    stamps = {p: (run / p).stat().st_mtime_ns for p in ("onnx/full.onnx", "engines/full.ort.onnx")}
    assert main(args) == 0  # valid stages are kept
    assert stamps == {p: (run / p).stat().st_mtime_ns for p in stamps}
    (run / "engines" / "full.ort.onnx").write_bytes(b"tampered")
    assert main(args) == 0  # an invalid stage is rebuilt
    assert (run / "engines" / "full.ort.onnx").stat().st_mtime_ns != stamps["engines/full.ort.onnx"]


def test_inspect_reports_checksums(built, tmp_path, capsys):
    from qandc.cli import main
    _, root = built
    assert main(["inspect", str(root / "engines")]) == 0
    out = capsys.readouterr().out
    assert "full.ort.onnx: OK" in out and "backends runnable here: onnxruntime" in out
    import shutil
    shutil.copytree(root / "engines", tmp_path / "e")
    (tmp_path / "e" / "reuse.ort.onnx").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "e")]) == 0
    assert "reuse.ort.onnx: CHECKSUM MISMATCH" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 2


def test_batches_beyond_a_tensorrt_profile_are_refused(built):
    from qandc.engines import load_engines
    from qandc.runtime import EngineDenoiser
    _, root = built
    manifest, engines = load_engines(root / "engines")
    denoiser = EngineDenoiser(dataclasses.replace(manifest, backend="tensorrt", build={"max_batch": 2}), engines)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    with pytest.raises(QandcError, match="exceeds the engines' profile of 2"):
        denoiser.forward_graph(manifest.graphs["full"], {"x": x, "t": t, "y": y})
    assert denoiser.forward_graph(manifest.graphs["full"], {"x": x[:2], "t": t[:2], "y": y[:2]})["out"].shape == (
        2, 8, 8, 8)


@pytest.fixture(scope="module")
def overflowed_fp8(tmp_path_factory):
    """FP8 engines whose first activation scale overflowed to inf: every full step's output is NaN (x / inf
    quantizes to 0, and 0 dequantizes to 0 * inf)."""
    import json

    import onnx
    from onnx import numpy_helper

    from qandc.artifacts import sha256_file
    from qandc.model import save_checkpoint

    model = tiny_model(guidance="all")
    root = tmp_path_factory.mktemp("fp8")
    settings = CalibrationSettings(preset="w8a8-fp8", selector="random", budget=20, plan=PLAN, pool_samples=4,
                                   steps=8, selector_params=SelectorParams(k=4), vc="none", batch_size=4)
    calibrate(model, root / "recipe", settings)
    save_checkpoint(model, root / "tiny.pt", {})
    export(model, root / "onnx", recipe_dir=root / "recipe", checkpoint=str(root / "tiny.pt"))
    graph = onnx.load(root / "onnx" / "full.onnx")
    quantizer = next(n for n in graph.graph.node if n.op_type == "QuantizeLinear" and "input_quantizer" in n.name)
    prefix = quantizer.name.rsplit("/", 1)[0]
    for node in [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                 and n.name.startswith(prefix)]:
        producer = next(n for n in graph.graph.node if node.input[1] in n.output)  # the scale's Constant
        scale = next(a for a in producer.attribute if a.name == "value").t
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * float("inf"), scale.name))
    onnx.save(graph, root / "onnx" / "full.onnx")
    manifest = json.loads((root / "onnx" / "manifest.json").read_text())
    manifest["files"]["full.onnx"] = sha256_file(root / "onnx" / "full.onnx")
    (root / "onnx" / "manifest.json").write_text(json.dumps(manifest))
    build_engines(root / "onnx", root / "engines", "onnxruntime")
    return model, root


def test_nan_guard_names_the_steps_and_falls_back(overflowed_fp8, tmp_path):
    model, root = overflowed_fp8
    # the NaN cache of a full step spoils the reuse steps after it
    with pytest.raises(QandcError, match=r"non-finite engine outputs at 8 of 8 steps: step 0 \(full engine\), "
                                         r"step 1 \(reuse engine\)"):
        Pipeline.load(root / "engines").generate([1, 2], seed=3, steps=8)
    pipeline = Pipeline.load(root / "engines", fallback=True)
    images = pipeline.generate([1, 2], seed=3, steps=8)
    assert torch.isfinite(images).all()
    assert pipeline.last_run == {"full": 3, "reuse": 5, "graphs": {"full": 3, "reuse": 5},
                                 "fallback_steps": [{"step": s, "engine": "full"} for s in (0, 3, 6)]}
    from qandc.cli import main

    # the CLI: one line without the fallback, finite images with it
    assert main(["generate", "--engines", str(root / "engines"), "--labels", "1,2", "--steps", "8",
                 "--out", str(tmp_path / "a")]) == 2
    assert main(["generate", "--engines", str(root / "engines"), "--labels", "1,2", "--steps", "8",
                 "--nan-fallback", "--out", str(tmp_path / "b")]) == 0
    assert np.isfinite(np.load(tmp_path / "b" / "samples.npz")["samples"]).all()
