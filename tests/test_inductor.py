"""Inductor engines: real FP8 / INT8 layers against ModelOpt's fake quant, the exported engines against the module,
the runtime over them against the fake-quant PyTorch pipeline. On the CPU the exported programs run eagerly and
INT8 runs through PyTorch integer matmuls; the Triton kernel, torch.compile and CUDA graphs run only on a GPU
(those tests skip here)."""

import copy
import json

import pytest
import torch

from conftest import python_json, rel_err, tiny_model
from qandc.calibration import CalibrationSettings, SelectorParams, apply_recipe, calibrate
from qandc.engines import load_engines
from qandc.engines import build_inductor
from qandc.engines.quantized import (FusedFp8Mlp, QuantLinear, fp8_linear_gelu_quant, int8_linear,
                                     quantize_for_inference)
from qandc.errors import QandcError
from qandc.formats.recipe import QuantRecipe
from qandc.runtime import Pipeline
from qandc.sampling import CachePlan, sample

pytest.importorskip("modelopt")
PLAN = CachePlan.interval(3)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton, torch.compile, graphs)")
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


@pytest.fixture(scope="module", params=["w8a8-int8", "w8a8-fp8"])
def recipe(request, tmp_path_factory):
    model = tiny_model(guidance="all")
    folder = tmp_path_factory.mktemp(request.param)
    settings = CalibrationSettings(preset=request.param, selector="random", budget=20, plan=PLAN, pool_samples=4,
                                   steps=8, selector_params=SelectorParams(k=4), vc="var", vc_samples=4,
                                   batch_size=4)
    calibrate(model, folder, settings)
    return model, folder


@pytest.mark.parametrize("device", DEVICES)
def test_real_quant_model_matches_fake_quant(recipe, device):
    model, folder = recipe
    model = model.to(device)
    fake, _ = apply_recipe(copy.deepcopy(model), folder)
    real = quantize_for_inference(model, folder)
    layers = [m for m in real.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 5 * model.config.depth and real.blocks[0].mlp.fc1.weight.dtype in (torch.int8,
                                                                                            torch.float8_e4m3fn)
    x = torch.randn(6, 4, 8, 8, device=device)
    t, y = torch.tensor([0, 100, 400, 700, 900, 999], device=device), torch.tensor([0, 1, 2, 3, 10, 10],
                                                                                  device=device)
    with torch.no_grad():
        expected, got = fake(x, t, y), real(x.bfloat16(), t, y).float()
        plain = quantize_for_inference(model, None)(x.bfloat16(), t, y).float()
    # bf16 activations dominate: the real-quant model is as close to fake quant as plain bf16 is to float32
    assert rel_err(got, expected) < 2 * rel_err(plain, model(x, t, y)) + 1e-3
    assert rel_err(got, expected) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (37, 256, 96), (300, 1152, 640)])
def test_int8_linear_is_exact_integer_arithmetic(device, m, k, n):
    """The kernel's int32 accumulation is exact; only the bf16 output rounds (relative error <= 2^-8)."""
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    scale, bias = torch.rand(n, device=device) * 1e-3, torch.randn(n, device=device)
    got = int8_linear(x, w, scale, bias.bfloat16()).double()
    expected = (x.double() @ w.double().t()) * scale.double() + bias.bfloat16().double()
    assert got.shape == (m, n) and ((got - expected).abs() <= expected.abs() * 2 ** -8 + 1e-6).all()


def test_a_zero_amax_is_refused():
    with pytest.raises(QandcError, match="amax 0 is zero or not finite"):
        QuantLinear(torch.nn.Linear(8, 4), torch.zeros(4, 1), torch.tensor(1.0), "int8", "blocks.0.mlp.fc1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,per_channel", [("fp8", False), ("fp8", True), ("int8", False)])
def test_stacked_quant_linears_give_each_layers_output_side_by_side(device, fmt, per_channel):
    """Layers of one input scale (a DiT's adaLN Linears all take the condition) as one GEMM: each slice of its
    output is what its layer computes, though their weight scales differ; layers of other input scales refuse."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, 48) for _ in range(3)]
    amax = lambda lin: lin.weight.abs().amax(1, keepdim=True) if per_channel else lin.weight.abs().amax()  # noqa
    layers = [QuantLinear(lin, amax(lin) * (i + 1), torch.tensor(3.0), fmt).to(device)
              for i, lin in enumerate(linears)]
    stacked = QuantLinear.stacked(layers)
    x = torch.randn(32, 64, device=device).bfloat16()
    with torch.no_grad():
        want = torch.cat([layer(x) for layer in layers], dim=1).float()
        got = stacked(x).float()
    assert got.shape == (32, 144) and rel_err(got, want) < 1e-2
    assert not torch.equal(got[:, :48], got[:, 48:96])
    with pytest.raises(QandcError, match="one input scale"):
        QuantLinear.stacked([layers[0], QuantLinear(linears[1], amax(linears[1]), torch.tensor(2.0), fmt).to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_engines_run_the_q_and_c_pipeline(recipe, tmp_path, device):
    model, folder = recipe
    model = model.to(device)
    manifest = build_inductor(model, tmp_path, recipe_dir=folder, batch_sizes=[6])
    assert manifest.backend == "inductor" and manifest.plan == PLAN
    assert set(manifest.files) == {"full.pt2", "reuse.pt2"} | ({"inductor-cache.bin", "triton-autotune.json"}
                                                                if device == "cuda" else set())
    engine_model = quantize_for_inference(model, folder)
    _, engines = load_engines(tmp_path)
    x, t, y = torch.randn(6, 4, 8, 8, device=device), torch.arange(6, device=device) * 150, torch.arange(6,
                                                                                                   device=device)
    full_graph, reuse_graph = manifest.graphs["full"], manifest.graphs["reuse"]
    full = engines["full"].infer({"x": x, "t": t, "y": y})
    with torch.no_grad():
        expected = engine_model.forward_graph(full_graph, {"x": x, "t": t, "y": y})
        reused = engine_model.forward_graph(reuse_graph, {"x": x, "t": t, "y": y, **{
            n: expected[n] for n in reuse_graph.cache_inputs}})["out"]
    assert all(full[n].dtype == torch.bfloat16 for n in full_graph.output_names)  # "model" tensors of a bf16 engine
    assert rel_err(full["out"].float(), expected["out"].float()) < 1e-2
    got = engines["reuse"].infer({"x": x, "t": t, "y": y, **{n: full[n] for n in reuse_graph.cache_inputs}})
    assert rel_err(got["out"].float(), reused.float()) < 1e-2

    pipeline = Pipeline.load(tmp_path)
    images = pipeline.generate([1, 2, 3], seed=4, steps=8)
    fake, _ = apply_recipe(copy.deepcopy(model), folder)
    vc = pipeline.vc
    from qandc.formats.recipe import vc_correction
    expected = sample(fake, [1, 2, 3], 8, "ddpm", 1.5, seed=4, plan=PLAN, correction=vc_correction(vc, 8, "t"))
    assert pipeline.denoiser.calls == {"full": 3, "reuse": 5}
    assert rel_err(images.cpu(), expected.cpu()) < 5e-2


def test_a_build_record_naming_a_file_outside_the_checksummed_ones_is_refused(recipe, tmp_path):
    model, folder = recipe
    build_inductor(model, tmp_path, recipe_dir=folder)
    (tmp_path / "choices.json").write_text("{}")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["build"]["autotune_choices"] = "choices.json"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QandcError, match="autotune_choices 'choices.json' is not one of the manifest's checksummed"):
        load_engines(tmp_path)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_engines_of_a_dit_with_per_block_embedders(tmp_path, device):
    model = tiny_model(guidance="all", block_embedders=True).to(device)
    build_inductor(model, tmp_path, PLAN, batch_sizes=[3])
    pipeline = Pipeline.load(tmp_path)
    expected = sample(quantize_for_inference(model, None), [1, 2, 3], 8, "ddpm", 1.5, seed=4, plan=PLAN)
    assert rel_err(pipeline.generate([1, 2, 3], seed=4, steps=8).cpu(), expected.cpu()) < 1e-2


@gpu
def test_cuda_graphs_replay_what_eager_engines_compute(recipe, tmp_path):
    model, folder = recipe
    build_inductor(model.to("cuda"), tmp_path, recipe_dir=folder, batch_sizes=[4])
    graphed = Pipeline.load(tmp_path).generate([1, 5], seed=2, steps=8)
    eager = Pipeline.load(tmp_path, compile=False, cuda_graphs=False).generate([1, 5], seed=2, steps=8)
    assert rel_err(graphed, eager) < 1e-2


@gpu
def test_whole_run_graphs_of_interleaved_batch_sizes_sample_what_the_steps_do(recipe, tmp_path):
    """Whole-run CUDA graphs of several batch sizes, batches launched in turn as a server's engine process launches
    them (the next before the last one's samples are read): each batch's samples those of the step-by-step engines,
    all finite. Session 21's serve load run on the reference model's INT8 engines with `--run-graphs` failed 27% of
    the requests at a quarter load (small buckets) on non-finite samples, none without run graphs (session 13)."""
    model, folder = recipe
    build_inductor(model.to("cuda"), tmp_path, recipe_dir=folder, batch_sizes=[4])
    steps, whole = Pipeline.load(tmp_path), Pipeline.load(tmp_path, run_graphs=True)
    batches = [([1, 5], 2, 1.5), ([3, 3, 0, 9], 4, 1.5), ([7], 5, 1.5), ([3, 3, 0, 9], 3, 1.0), ([1, 5], 6, 1.5),
               ([2, 4, 6, 8, 0, 1], 7, 1.5), ([3, 3, 0, 9], 8, 1.5), ([7], 9, 1.5), ([4, 4, 2, 1], 1, 1.0),
               ([2, 4, 6, 8, 0, 1], 10, 1.5)]  # unguided 4 labels: the rows of guided 2, another graph
    launched = [whole.generate(labels, seed, steps=8, cfg_scale=cfg, allow_nonfinite=True)
                for labels, seed, cfg in batches]
    for (labels, seed, cfg), got in zip(batches, launched):
        want = steps.generate(labels, seed, steps=8, cfg_scale=cfg)
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5, (labels, seed, cfg)
    assert len(whole.run_graphs) == 5


@gpu
def test_a_fresh_process_takes_the_builds_compilations_and_autotuning_choices(recipe, tmp_path):
    """A process loading the engines with empty Triton and Inductor cache folders, its main script importing
    multiprocessing and then torch (as the serve benchmark's did, unlike the build's here): every compilation is a hit
    of the compile cache the engines carry (session 20: a fresh `qandc serve` missed all of them;
    `stable_cache_keys`), and no config of qandc's Triton kernels is timed: the build's choices came with the
    engines. Sessions 21-24 (H200): engines built in a process that had compiled some of their graphs before (the
    reuse graph INT8 and FP8 engines share, earlier tests' engines of the recipe) lacked those graphs: taken from the
    cache, they were left out of the saved one (`_fill_compile_cache`'s namespace)."""
    model, folder = recipe
    build_inductor(model.to("cuda"), tmp_path / "engines", recipe_dir=folder, batch_sizes=[4])
    saved = json.loads((tmp_path / "engines" / "triton-autotune.json").read_text())
    if "int8" in folder.name:
        assert saved["int8_gemm"]  # the INT8 GEMMs autotuned at the build's shapes
    code = ("import multiprocessing\nimport torch\nimport json\nfrom torch._dynamo.utils import counters\n"
            "from qandc.runtime import Pipeline\nfrom qandc.engines import autotune_choices\n"
            f"Pipeline.load({str(tmp_path / 'engines')!r}).generate([1, 5], seed=2, steps=8)\n"
            "tuners = autotune_choices.autotuners().items()\n"
            "print(json.dumps({'timed': sorted(n for n, t in tuners if hasattr(t, 'bench_time')),\n"
            "                  **{k: counters['inductor'][f'fxgraph_cache_{k}'] for k in ('hit', 'miss')}}))")
    loaded = python_json(code, {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
                                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert loaded["timed"] == []
    assert loaded["miss"] == 0 and loaded["hit"] > 0, loaded


def refused_without_fp8(model, folder, tmp_path, message: str, **fusion) -> bool:
    """Whether `folder`'s recipe is not W8A8-FP8; if so, `build_inductor` has refused the FP8 `fusion` with
    `message` and left no engines behind."""
    if QuantRecipe.load(folder).preset == "w8a8-fp8":
        return False
    with pytest.raises(QandcError, match=message):
        build_inductor(model, tmp_path / "engines", recipe_dir=folder, **fusion)
    assert not (tmp_path / "engines").exists()
    return True


@pytest.mark.parametrize("device", DEVICES)
def test_fused_fp8_mlps_compute_what_the_unfused_ones_do(recipe, tmp_path, device):
    """fc1, GELU and fc2's activation quantize as one op: as close to fake quant as the unfused engines; its
    engines export the op and run it; an INT8 recipe has no FP8 MLP to fuse."""
    model, folder = recipe
    model = model.to(device)
    if refused_without_fp8(model, folder, tmp_path, "no MLP with FP8 fc1 and fc2 to fuse", fused_fp8_mlp=True):
        kept = quantize_for_inference(model, folder, fused_fp8_mlp=True)
        assert not any(isinstance(m, FusedFp8Mlp) for m in kept.modules())
        return
    fused = quantize_for_inference(model, folder, fused_fp8_mlp=True)
    unfused = quantize_for_inference(model, folder)
    assert sum(isinstance(m, FusedFp8Mlp) for m in fused.modules()) == model.config.depth
    fake, _ = apply_recipe(copy.deepcopy(model), folder)
    x = torch.randn(6, 4, 8, 8, device=device)
    t = torch.tensor([0, 100, 400, 700, 900, 999], device=device)
    y = torch.tensor([0, 1, 2, 3, 10, 10], device=device)
    with torch.no_grad():
        expected, got = fake(x, t, y), fused(x.bfloat16(), t, y).float()
        before = unfused(x.bfloat16(), t, y).float()
    assert rel_err(got, before) < 2e-2 and rel_err(got, expected) < 1.5 * rel_err(before, expected) + 1e-3
    hidden = torch.randn(6, 16, model.config.hidden_size, device=device).bfloat16()
    for one, other in zip(fused.blocks, unfused.blocks):  # e4m3 steps apart where bf16 rounding crossed one (~1%)
        with torch.no_grad():
            assert rel_err(one.mlp(hidden).float(), other.mlp(hidden).float()) < 3e-2

    manifest = build_inductor(model, tmp_path / "engines", recipe_dir=folder, batch_sizes=[6], fused_fp8_mlp=True)
    assert manifest.build["fused_fp8_mlps"] == model.config.depth
    full = Pipeline.load(tmp_path / "engines").denoiser
    program = torch.export.load(str(tmp_path / "engines" / "full.pt2"))
    assert sum("fp8_linear_gelu_quant" in str(node.target) for node in program.graph.nodes) == model.config.depth
    with torch.no_grad():
        want = fused.forward_graph(manifest.graphs["full"], {"x": x, "t": t, "y": y})["out"]
        engines = full.forward_graph(manifest.graphs["full"], {"x": x, "t": t, "y": y})["out"]
    assert rel_err(engines.float(), want.float()) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_fast_accumulation_engines_carry_it_into_every_fp8_gemm(recipe, tmp_path, device):
    """`fp8_fast_accum`: every `_scaled_mm` of the exported engines (and the fused MLP op) runs without promotion,
    the manifest says so, and the outputs stay those of the promoting engines up to accumulation order."""
    model, folder = recipe
    if QuantRecipe.load(folder).preset != "w8a8-fp8":
        pytest.skip("FP8 only")
    model = model.to(device)
    x, t, y = torch.randn(6, 4, 8, 8, device=device), torch.tensor([0, 100, 400, 700, 900, 999], device=device), \
        torch.tensor([0, 1, 2, 3, 10, 10], device=device)
    outs = {}
    for fast in (False, True):
        out = tmp_path / f"engines-{fast}"
        manifest = build_inductor(model, out, recipe_dir=folder, batch_sizes=[6], fused_fp8_mlp=True,
                                  fp8_fast_accum=fast)
        assert manifest.build["fp8_fast_accum"] is fast
        program = torch.export.load(str(out / "full.pt2"))
        gemms = [n for n in program.graph.nodes if "_scaled_mm" in str(n.target)
                 or "fp8_linear_gelu_quant" in str(n.target)]
        assert len(gemms) > model.config.depth  # fc1 (fused) and at least fc2 a block
        assert [accumulates_fast(node) for node in gemms] == [fast] * len(gemms)
        with torch.no_grad():
            outs[fast] = Pipeline.load(out).denoiser.forward_graph(manifest.graphs["full"],
                                                                   {"x": x, "t": t, "y": y})["out"].float()
    assert rel_err(outs[True], outs[False]) < 2e-2


def accumulates_fast(node) -> bool:
    """An exported FP8 GEMM node's `use_fast_accum` (`_scaled_mm`) or `fast_accum` (the fused op), by its schema."""
    arguments = node.target._schema.arguments
    i = next(i for i, a in enumerate(arguments) if a.name in ("use_fast_accum", "fast_accum"))
    return bool(node.kwargs.get(arguments[i].name, node.args[i] if len(node.args) > i else arguments[i].default_value))


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (37, 256, 96), (300, 1152, 640)])
def test_fp8_linear_gelu_quant_is_gelu_of_the_exact_product_rounded_once(m, k, n):
    """e4m3 products are exact in float32 up to accumulation order: the output is the e4m3 rounding of GELU of the
    float64 result, give or take one e4m3 step (the accumulation and the float32 GELU may cross a rounding
    boundary)."""
    torch.manual_seed(m)
    x = (torch.randn(m, k) * 4).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k) * 4).to(torch.float8_e4m3fn)
    scale, bias, out_scale = torch.rand(n) * 1e-2, torch.randn(n).bfloat16(), torch.tensor(0.05)
    got = fp8_linear_gelu_quant(x, w, scale, bias, out_scale).double()
    product = (x.double() @ w.double().t()) * scale.double() + bias.double()
    exact = torch.nn.functional.gelu(product, approximate="tanh")
    want = (exact / 0.05).clamp(-448, 448)
    assert got.shape == (m, n) and ((got - want).abs() <= want.abs() * 2 ** -3 + 2 ** -9).all()
    assert (got.abs() <= 448).all() and (got == want.to(torch.float8_e4m3fn).double()).float().mean() > 0.97


@pytest.mark.parametrize("device", DEVICES)
def test_fused_fp8_norms_compute_what_the_unfused_blocks_do(recipe, tmp_path, device):
    """Residual add, LayerNorm, modulation and quantize before qkv and fc1 as one op, the MLP's add handed to the
    next block: the unfused engines' outputs and cache tensors, full and reuse, gated or not; its engines export
    the op (every branch input but the first block's attention) and run it; INT8 has nothing to fuse."""
    model, folder = recipe
    model = model.to(device)
    if refused_without_fp8(model, folder, tmp_path, "no block with FP8 qkv and fc1", fused_fp8_norm=True):
        return
    depth = model.config.depth
    fused = quantize_for_inference(model, folder, fused_fp8_mlp=True, fused_fp8_norm=True)
    unfused = quantize_for_inference(model, folder, fused_fp8_mlp=True)
    assert [getattr(b, "last", None) for b in fused.blocks] == [False] * (depth - 1) + [True]
    # every block's adaLN Linear takes the one condition: one GEMM for all, in the first block
    assert [(b.slot, b.modulations is not None) for b in fused.blocks] == [(i, i == 0) for i in range(depth)]
    x = torch.randn(6, 4, 8, 8, device=device).bfloat16()
    t = torch.tensor([0, 100, 400, 700, 900, 999], device=device)
    y = torch.tensor([0, 1, 2, 3, 10, 10], device=device)
    with torch.no_grad():
        assert rel_err(fused(x, t, y).float(), unfused(x, t, y).float()) < 1e-2
        for regate in (True, False):
            want, cache = unfused.forward_full(x, t, y, regate=regate)
            got, emitted = fused.forward_full(x, t, y, regate=regate)
            assert rel_err(got.float(), want.float()) < 1e-2 and emitted.keys() == cache.keys()
            assert max(rel_err(emitted[b].float(), cache[b].float()) for b in cache) < 5e-2
            some = {b: cache[b] for b in list(cache)[1::3]}  # reused branches between computed ones, both kinds
            assert rel_err(fused.forward_reuse(x, t, y, some, regate=regate).float(),
                           unfused.forward_reuse(x, t, y, some, regate=regate).float()) < 1e-2

    manifest = build_inductor(model, tmp_path / "engines", recipe_dir=folder, batch_sizes=[6], fused_fp8_mlp=True,
                              fused_fp8_norm=True)
    assert manifest.build["fused_fp8_norm_blocks"] == depth
    program = torch.export.load(str(tmp_path / "engines" / "full.pt2"))
    assert sum("add_norm_modulate_fp8" in str(node.target) for node in program.graph.nodes) == 2 * depth - 1
    # the blocks' adaLN weights only as the first block's stacked ones
    weights = [name for name in program.state_dict if ".blocks." in name and name.endswith(".weight")]
    assert [w for w in weights if "modulation" in w] == ["model.blocks.0.modulations.1.weight"]
    feeds = {"x": x.float(), "t": t, "y": y}
    with torch.no_grad():
        want = fused.forward_graph(manifest.graphs["full"], feeds)["out"]
        engines = Pipeline.load(tmp_path / "engines").denoiser.forward_graph(manifest.graphs["full"], feeds)["out"]
    assert rel_err(engines.float(), want.float()) < 1e-2


@gpu
def test_compiled_the_norm_op_takes_its_residual_stream_contiguous(monkeypatch):
    """Compiled from an exported program, as the engines are, a fused block's norm op gets a contiguous residual
    stream even where the graph makes it transposed (as the patch embedding's convolution does), and nothing is
    copied to make it so but the stream itself: the op's wrapper copied it eagerly (`aten::copy_ [32, 256, 1152]`,
    63 µs a DiT-XL/2 step on an H200, session 21); the op's contiguous-strides tag instead made Inductor copy the
    adaLN chunks too (`triton_poi_fused_add_norm_modulate_fp8_split_view_*`)."""
    from qandc.engines import quantized, triton_norm

    seen = []

    def recorded(x, delta, gate, shift, scale, *rest):
        seen.append([t.is_contiguous() for t in (x, delta, gate)])
        return kernel(x, delta, gate, shift, scale, *rest)

    kernel = triton_norm.add_norm_modulate_fp8
    monkeypatch.setattr(triton_norm, "add_norm_modulate_fp8", recorded)
    norm = torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)

    class Step(torch.nn.Module):
        def forward(self, image, delta, modulation):
            x = image.flatten(2).transpose(1, 2) + 1  # [B, T, C], its channels no longer innermost in memory
            gate, shift, scale = modulation.chunk(3, dim=1)  # rows of the adaLN output: strided
            stream = quantized._Residual(x, delta, gate)
            return stream.branch_input(norm, shift, scale, torch.tensor(0.5, device=x.device)), stream.x

    inputs = [torch.randn(shape, device="cuda").bfloat16() for shape in ((2, 64, 8, 8), (2, 64, 64), (2, 192))]
    program = torch.export.export(Step(), tuple(inputs))
    torch._dynamo.reset()
    got_q, got_x = torch.compile(program.module())(*inputs)
    want_q, want_x = Step()(*inputs)
    assert seen == [[True, True, False]] * 2  # compiled, then eagerly; the gate strided both times
    assert torch.equal(got_x, want_x) and (got_q.float() == want_q.float()).float().mean() > 0.99


@gpu
def test_a_forecasting_full_graph_reads_no_memory_it_did_not_write(tmp_path):
    """The reference model's quick INT8 engines under the default plan's shape (forecast 1), compiled at 16 rows: with
    the caching allocator's free memory NaN before each call, every call gives, bit for bit, what a call over zeroed
    memory gave, all finite. Session 23 (H200, torch 2.11): before `one_pass_reductions`, this graph's cached trunk
    came from a looped reduction kernel that read back what it had stored in its first loop, and its outputs followed
    the free memory -- NaN trunks in 5 of 10 calls, samples non-finite from the next reuse step
    (`run_graph_check.py --localize 16`). (Against the eager program the forecast's difference is not a fair
    reference: eager rounds the trunk to bf16 before subtracting, 17% off the compiled difference on the H200.)"""
    from qandc.bench import config_engines, make_model
    from qandc.model.graphs import example_feeds

    engines, _ = config_engines("reference", make_model("reference", "cuda"), "w8a8-int8", "default-shape", tmp_path,
                                [16])
    compiled, eager = (Pipeline.load(engines, compile=c, cuda_graphs=False).denoiser for c in (True, False))
    feeds = example_feeds(eager, eager.graphs, 16)["full"]  # the eager program computes the cache inputs
    full = compiled.direct_engines["full"]

    def call_over(fill: float) -> dict:
        torch.full((1 << 28,), fill, device="cuda")  # 1 GiB, freed at once: what the call allocates
        return {n: t.clone() for n, t in full.infer({n: t.clone() for n, t in feeds.items()}).items()}

    want = call_over(0.0)
    assert all(torch.isfinite(t).all() for t in want.values())
    for _ in range(5):
        got = call_over(float("nan"))
        assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]


@gpu
def test_reductions_compile_one_pass_whatever_their_hint():
    """Under `one_pass_reductions`, a LayerNorm over rows read transposed (the patch embedding's layout, not an
    "inner" reduction to Inductor) fused with a stored difference -- the last kernel of a forecasting full graph in
    small -- compiles to one-pass kernels only: no reduction loop, so nothing stored in one loop is read back in
    another."""
    from torch._inductor.utils import run_and_get_code

    from qandc.engines.inductor_backend import one_pass_reductions

    def last_kernel(x, conv, old, weight):
        embedded = conv.flatten(2).transpose(1, 2).float()
        trunk = x.float() - embedded
        normed = torch.nn.functional.layer_norm(x.float() + embedded, (x.shape[-1],))
        return normed.bfloat16(), trunk, (trunk - old) * weight

    inputs = (torch.randn(16, 256, 256, device="cuda").bfloat16(),
              torch.randn(16, 256, 16, 16, device="cuda").bfloat16(), torch.randn(16, 256, 256, device="cuda"),
              torch.rand(16, 1, 1, device="cuda"))
    torch._dynamo.reset()
    with one_pass_reductions():
        got, code = run_and_get_code(torch.compile(last_kernel, dynamic=False), *inputs)
    kernels = "".join(code)
    assert "persistent_reduction" in kernels and "for r0_offset" not in kernels
    for g, w in zip(got, last_kernel(*inputs)):
        assert rel_err(g.float(), w.float()) < 1e-2
