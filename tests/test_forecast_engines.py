"""Engines under forecasting and several reuse sets: every graph of the plan is exported and built, each engine
computes what its graph computes in PyTorch (factors included), and sampling through the engines follows the PyTorch
sampler: ONNX Runtime engines against the float model, Inductor engines (run eagerly on the CPU, bf16) against the
bf16 and the float model; on a GPU, replayed CUDA graphs compute what the eager engines compute. A manifest whose
graphs are not its plan's is refused."""

import copy
import json

import pytest
import torch

from conftest import rel_err, tiny_model
from qandc.errors import QandcError
from qandc.formats.recipe import VarianceCompensation
from qandc.model.graphs import example_feeds
from qandc.sampling import CachePlan, sample

pytest.importorskip("onnxruntime")

from qandc.engines import build_engines, build_inductor, load_engines  # noqa: E402
from qandc.engines.quantized import quantize_for_inference  # noqa: E402
from qandc.exporter import export  # noqa: E402
from qandc.exporter.onnx_export import factor_branch  # noqa: E402
from qandc.formats.manifest import ExportManifest  # noqa: E402
from qandc.runtime import EngineDenoiser, Pipeline  # noqa: E402

STEPS, LABELS, SEED = 8, [1, 2, 7], 5
FORECAST = CachePlan.interval(3, forecast=2)


def searched(forecast: int, factors: str = "float32") -> CachePlan:
    """A plan as the search writes one: three reuse sets (one reusing every branch), graphs in any order."""
    return CachePlan.from_steps(["full", "reuse", "reuse1", "reuse", "full", "reuse2", "reuse2", "reuse1"],
                                branches=("blocks.0.attn", "blocks.1.mlp"),
                                reuse_sets=(("blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"),
                                            ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")),
                                forecast=forecast, factors=factors)


def graph_err(got: dict, expected: dict, name: str) -> float:
    """The error of output `name`, relative to its norm (a forecast factor's: its branch value's)."""
    return rel_err(got[name].float(), expected[name].float()) * float(
        expected[name].float().norm() / expected[factor_branch(name)].float().norm())


def counts(plan: CachePlan) -> dict:
    graphs = plan.step_graphs(STEPS)
    return {name: graphs.count(name) for name in ("full", *plan.graph_names)}


PLANS = {"interval-forecast2": FORECAST, "searched-forecast2": searched(2), "searched-bf16": searched(2, "bf16"),
         "searched-order0": searched(0)}


@pytest.fixture(scope="module")
def model():
    return tiny_model(guidance="all")


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """build(backend, plan name): the folder of the plan's engines (an export beside them for onnxruntime), each
    built once."""
    folders = {}

    def build(backend: str, plan: str):
        if (backend, plan) not in folders:
            root = tmp_path_factory.mktemp(f"{backend}-{plan}")
            if backend == "inductor":
                build_inductor(model, root / "engines", PLANS[plan])
            else:
                export(model, root / "onnx", PLANS[plan])
                build_engines(root / "onnx", root / "engines", "onnxruntime")
            folders[backend, plan] = root
        return folders[backend, plan]
    return build


@pytest.mark.parametrize("plan", ["interval-forecast2", "searched-forecast2", "searched-order0"])
def test_onnxruntime_engines_follow_the_pytorch_sampler(model, built, plan):
    root = built("onnxruntime", plan)
    checks = ExportManifest.read(root / "onnx").checks
    assert set(checks) == {"full", *PLANS[plan].graph_names}
    assert all(c["polygraphy_onnxrt_rel_error"] < 1e-5 for c in checks.values())
    manifest, engines = load_engines(root / "engines")
    feeds = example_feeds(model, manifest.graphs, batch=3)
    for name, graph in manifest.graphs.items():
        got = engines[name].infer(feeds[name])
        with torch.no_grad():
            expected = model.forward_graph(graph, feeds[name])
        assert all(graph_err(got, expected, n) < 1e-5 for n in graph.output_names), name

    pipeline = Pipeline.load(root / "engines")
    images = pipeline.generate(LABELS, seed=SEED, steps=STEPS)
    assert rel_err(images, sample(model, LABELS, STEPS, "ddpm", 1.5, seed=SEED, plan=PLANS[plan])) < 1e-5
    assert pipeline.last_run["graphs"] == counts(PLANS[plan])
    assert pipeline.last_run["reuse"] == STEPS - counts(PLANS[plan])["full"]


def test_generate_records_the_steps_of_each_graph(built, tmp_path):
    from qandc.runtime import SamplingOptions, generate

    pipeline = Pipeline.load(built("onnxruntime", "searched-forecast2") / "engines")
    record = generate(pipeline, [1, 2, 3], tmp_path, SamplingOptions(steps=STEPS, batch_size=2))
    assert record["engine_steps_rank0"] == {"full": 4, "reuse": 12, "fallback_steps": 0, "graphs": {
        name: 2 * count for name, count in counts(PLANS["searched-forecast2"]).items()}}  # two shards


def test_onnx_refuses_bf16_factors(model, tmp_path):
    with pytest.raises(QandcError, match="^ONNX graphs take float32 factors; factors=bf16 is for the Inductor "
                                         "engines$"):
        export(model, tmp_path, CachePlan.interval(2, forecast=1, factors="bf16"))
    assert not tmp_path.joinpath("manifest.json").exists()


@pytest.mark.parametrize("edit", ["plan", "graphs"])
def test_a_manifest_whose_graphs_are_not_its_plans_is_refused(built, tmp_path, edit):
    data = json.loads((built("onnxruntime", "searched-forecast2") / "onnx" / "manifest.json").read_text())
    if edit == "plan":  # graphs declared for forecast=2 under a plan that says 1
        data["plan"]["forecast"] = 1
    else:  # a graph of the plan left out, with its file
        del data["graphs"]["reuse1"], data["onnx"]["reuse1"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(QandcError, match=r"manifest.json: field 'graphs' \(full, reuse.*\) does not declare the "
                                         "graphs its cache plan gives \\(made before"):
        ExportManifest.read(tmp_path, verify=False)


@pytest.mark.parametrize("plan", ["searched-forecast2", "searched-bf16", "searched-order0"])
def test_inductor_engines_follow_the_pytorch_sampler(model, built, plan):
    manifest, engines = load_engines(built("inductor", plan) / "engines")
    assert set(manifest.engines) == {"full", "reuse", "reuse1", "reuse2"}
    bf16 = quantize_for_inference(model, None)
    feeds = example_feeds(bf16, manifest.graphs, batch=3)  # cache tensors as the engines take them
    for name, graph in manifest.graphs.items():
        got = engines[name].infer(feeds[name])
        with torch.no_grad():
            expected = bf16.forward_graph(graph, feeds[name])
        assert all(got[n].dtype == expected[n].dtype and graph_err(got, expected, n) < 1e-3
                   for n in graph.output_names), name
    factors = {t.dtype for g in manifest.graphs.values() for t in g.outputs if t.role == "cache"}
    assert factors == {"searched-forecast2": {"float32"}, "searched-bf16": {"bfloat16"},
                       "searched-order0": {"model"}}[plan]

    pipeline = Pipeline.load(built("inductor", plan) / "engines")
    images = pipeline.generate(LABELS, seed=SEED, steps=STEPS)
    assert pipeline.last_run["graphs"] == counts(PLANS[plan])
    assert rel_err(images, sample(bf16, LABELS, STEPS, "ddpm", 1.5, seed=SEED, plan=PLANS[plan]).float()) < 2e-2
    assert rel_err(images, sample(model, LABELS, STEPS, "ddpm", 1.5, seed=SEED, plan=PLANS[plan])) < 5e-2


@pytest.mark.parametrize("plan", ["interval-forecast2", "searched-bf16", "searched-order0"])
def test_each_engine_sees_one_layout_of_its_inputs_over_a_run(model, built, plan):
    """A compiled engine specialises on its inputs' strides: the cache tensors it takes must have one layout whether
    they are the zeros a run starts from or factors an engine returned, and the build's example feeds that layout
    (the compile cache it fills is then what a run looks up)."""
    pipeline = Pipeline.load(built("inductor", plan) / "engines")
    layouts = {}
    for name, engine in pipeline.denoiser.engines.items():
        def infer(feeds, engine=engine, seen=layouts.setdefault(name, set())):
            seen.add(tuple((n, feeds[n].stride()) for n in engine.input_names))
            return type(engine).infer(engine, feeds)
        engine.infer = infer
    pipeline.generate(LABELS, seed=SEED, steps=STEPS)
    assert all(len(seen) == 1 for seen in layouts.values()), layouts
    feeds = example_feeds(quantize_for_inference(model, None), pipeline.manifest.graphs, batch=2 * len(LABELS))
    for name, (layout,) in layouts.items():
        assert tuple((n, feeds[name][n].stride()) for n, _ in layout) == layout, name


class NanOut:
    """An engine whose output `out` is NaN (as an overflowed FP8 scale leaves it); its cache tensors are kept."""

    def __init__(self, engine):
        self.engine, self.input_names, self.input_dtypes = engine, engine.input_names, engine.input_dtypes
        self.device = engine.device

    def infer(self, feeds):
        outputs = self.engine.infer(feeds)
        return {**outputs, "out": torch.full_like(outputs["out"], float("nan"))}


@pytest.mark.parametrize("plan", ["searched-forecast2", "searched-order0"])
def test_the_float_fallback_recomputes_a_graph_in_the_engines_dtypes(model, built, plan):
    """The float model recomputes the steps of a non-finite graph; the bf16 engines after it take its cache tensors
    (they check the dtypes they are fed)."""
    manifest, engines = load_engines(built("inductor", plan) / "engines")
    denoiser = EngineDenoiser(manifest, {**engines, "reuse1": NanOut(engines["reuse1"])}, fallback=model)
    pipeline = Pipeline(denoiser, manifest.plan)
    images = pipeline.generate(LABELS, seed=SEED, steps=STEPS)
    assert pipeline.last_run["fallback_steps"] == [{"step": 2, "engine": "reuse1"}, {"step": 7, "engine": "reuse1"}]
    assert rel_err(images, sample(model, LABELS, STEPS, "ddpm", 1.5, seed=SEED, plan=PLANS[plan])) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile, CUDA graphs)")
@pytest.mark.parametrize("plan", ["searched-forecast2", "searched-order0"])
def test_cuda_graphs_replay_what_eager_engines_compute(model, tmp_path, plan):
    """Factors one graph returns are fed to another graph and back to the same one (reuse2 twice in a row): the
    replayed CUDA graphs read them in place or copied, never a buffer being written."""
    build_inductor(copy.deepcopy(model).to("cuda"), tmp_path, PLANS[plan], batch_sizes=[6])
    graphed = Pipeline.load(tmp_path)
    images = graphed.generate(LABELS, seed=SEED, steps=STEPS)
    again = graphed.generate(LABELS, seed=SEED, steps=STEPS)  # replays only
    eager = Pipeline.load(tmp_path, compile=False, cuda_graphs=False).generate(LABELS, seed=SEED, steps=STEPS)
    assert rel_err(images, eager) < 1e-2 and rel_err(again, images) < 1e-5
    assert graphed.last_run["graphs"] == counts(PLANS[plan])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile, CUDA graphs)")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_on_the_engines_never_waits_for_the_gpu(model, tmp_path, sampler):
    """A whole sampling run on CUDA-graph engines (forecast weights, DDPM noise, VC) without one host-device sync,
    so the host queues steps ahead of the GPU (torch's sync debug mode turns any sync into an error)."""
    build_inductor(copy.deepcopy(model).to("cuda"), tmp_path, PLANS["searched-forecast2"], batch_sizes=[6])
    pipeline = Pipeline.load(tmp_path)
    pipeline.generate(LABELS, seed=SEED, steps=STEPS, sampler=sampler)  # compiles and captures
    vc = VarianceCompensation(torch.full((STEPS, model.config.in_channels), 1.01, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images = sample(pipeline.denoiser, LABELS, STEPS, sampler, 1.5, seed=SEED, plan=pipeline.plan, correction=vc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("plan, sampler", [("searched-forecast2", "ddpm"), ("interval-forecast2", "ddim")])
def test_whole_run_graphs_sample_what_the_steps_do(built, plan, sampler):
    """`Pipeline.load(run_graphs=True)`: a batch samples from static buffers refilled each time (initial noise,
    every step's noise, labels) with the Taylor weights the first run left; on the CPU it runs eagerly from them.
    Bitwise the step-by-step samples, batch after batch (other seeds, labels and ids), with the same step counts."""
    folder = built("onnxruntime", plan) / "engines"
    steps, whole = Pipeline.load(folder), Pipeline.load(folder, run_graphs=True)
    steps.vc = whole.vc = torch.linspace(0.98, 1.03, STEPS)[:, None].repeat(1, 4)  # VC after every step too
    for labels, seed, ids in (([1, 2, 7], SEED, [0, 1, 2]), ([4, 4, 0], 9, [3, 8, 1]), ([0, 1, 2], [1, 2, 3], None)):
        expected = steps.generate(labels, seed, STEPS, sampler, sample_ids=ids)
        assert torch.equal(whole.generate(labels, seed, STEPS, sampler, sample_ids=ids), expected)
        assert whole.last_run == steps.last_run and whole.last_run["graphs"] == counts(PLANS[plan])
    assert len(whole.run_graphs) == 1  # one shape and setting: one run graph, its buffers refilled
    with pytest.raises(QandcError, match="exclude each other"):
        Pipeline.load(folder, run_graphs=True, fallback=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile, CUDA graphs)")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_whole_run_cuda_graph_replays_what_the_step_graphs_compute(model, tmp_path, sampler):
    """One CUDA graph of the whole run (forecast weights, DDPM noise, VC) against one graph an engine call: the same
    kernels on the same inputs, batch after batch (the second and third replay refilled buffers)."""
    build_inductor(copy.deepcopy(model).to("cuda"), tmp_path, PLANS["searched-forecast2"], batch_sizes=[6])
    steps, whole = Pipeline.load(tmp_path), Pipeline.load(tmp_path, run_graphs=True)
    steps.vc = whole.vc = torch.linspace(0.98, 1.03, STEPS)[:, None].repeat(1, model.config.in_channels)
    for labels, seed in (([1, 2, 7], SEED), ([4, 4, 0], 9), ([0, 1, 2], 11)):
        expected = steps.generate(labels, seed, STEPS, sampler)
        got = whole.generate(labels, seed, STEPS, sampler)
        assert rel_err(got, expected) < 1e-5 and whole.last_run == steps.last_run
    assert whole.run_graphs[(3, STEPS, sampler, 1.5, 0.0, True)].captured[0] is not None  # a CUDA graph
