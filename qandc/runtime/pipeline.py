"""The runtime: loads an engine directory (or takes a PyTorch model) and samples with the one DDPM / DDIM
implementation of `qandc.sampling`, through an adapter that gives the engines the denoiser face: each step runs the
engine of the graph the plan gives it (full, reuse, reuse1, ...), fed the cache tensors the sampler keeps (the last
tensor of each name any graph returned: branch outputs, or forecast factors with the Taylor weights); VC is applied
after every step; the run reports how many steps each graph took (a cache that never fires is visible). Engines on a
GPU that accept it (Inductor) run each call as a replayed CUDA graph, one per graph and batch size.

NaN / Inf guard: every engine output is checked. By default ("check") the checks stay on the device and are read
once after the run, which then fails with the steps and engines that produced non-finite values (no black images
pass silently, and no per-step synchronisation slows the run); with a high-precision `fallback` model ("fallback")
each step is checked as it runs and a non-finite one is recomputed by the fallback model, and the run reports it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..engines import get_backend, load_engines
from ..errors import QandcError
from ..formats.manifest import EngineManifest
from ..formats.recipe import vc_correction
from ..model.dit import DiTConfig, branch_names
from ..sampling import (CachePlan, SamplerDefaults, SamplingRun, check_labels, draw_noise, draws_step_noise,
                        model_labels, sample, sample_generators)
from ..sampling.cache import to_device


class CudaGraphEngine:
    """An engine whose calls are captured once per input shapes as a CUDA graph and replayed. Its outputs are the
    graph's static buffers, overwritten by its next replay; `static_outputs` holds those of every graph of the set.
    An input that is a static output of another graph when captured (the reuse graphs reading the factors the full
    graph returned) is read in place; every other input is copied into a buffer of its own. At replay an input fed a
    tensor other than its buffer is copied in first, before the graph runs: a graph fed its own outputs (forecast
    factors refreshed again) reads them copied, never a buffer it is writing. Copying over another graph's output
    buffer is safe: each buffer carries one tensor name, and the sampler keeps the last tensor of each name, which
    here is the tensor being copied, not that buffer."""

    def __init__(self, engine, static_outputs: set):
        self.engine, self.static_outputs = engine, static_outputs
        self.input_names, self.input_dtypes, self.device = engine.input_names, engine.input_dtypes, engine.device
        self.graphs = {}

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = tuple(tuple(feeds[n].shape) for n in self.input_names)
        if key not in self.graphs:
            self.graphs[key] = self._capture(feeds)
        graph, inputs, outputs = self.graphs[key]
        for name, static in inputs.items():
            if feeds[name].data_ptr() != static.data_ptr():
                static.copy_(feeds[name])
        graph.replay()
        return dict(outputs)

    def _capture(self, feeds):
        inputs = {n: feeds[n] if feeds[n].data_ptr() in self.static_outputs else feeds[n].to(self.device).clone()
                  for n in self.input_names}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, autotune) outside the capture
            for _ in range(2):
                self.engine.infer(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.engine.infer(inputs)
        self.static_outputs.update(t.data_ptr() for t in outputs.values())
        return graph, inputs, outputs


class RunGraph:
    """A whole sampling run of one shape and setting (labels, steps, sampler, guidance, eta, plan, VC) as one CUDA
    graph: the engine calls and the sampler's arithmetic between them (a few dozen small kernels a step) replayed at
    once, where the step-by-step path launches them from Python, one engine graph a step. The first batch runs
    eagerly on the engines themselves (compiling, and leaving the VC table and the forecast's Taylor weights on the
    device: nothing is copied from the host inside the capture), then a run is captured on static buffers — initial
    noise, every step's noise, labels — which each batch refills with the numbers `sample` draws from the same
    generators. On a CPU the captured run is not a graph: each batch runs it eagerly from the same buffers."""

    def __init__(self, denoiser: "EngineDenoiser", steps: int, sampler: str, cfg_scale: float, eta: float,
                 plan: CachePlan, correction):
        self.denoiser, self.steps, self.sampler, self.cfg_scale, self.eta = denoiser, steps, sampler, cfg_scale, eta
        self.plan, self.correction = plan, correction
        config = denoiser.config
        self.shape = (config.in_channels, config.input_size, config.input_size)
        self.captured = None  # (graph or None, the run's static output, its engine calls, its finiteness checks)

    def sample(self, labels, seed, sample_ids) -> torch.Tensor:
        """The batch's final samples (a new tensor), as `sample` gives them for these labels, seeds and ids."""
        labels = check_labels(labels, self.denoiser.config.num_classes)
        generators = sample_generators(seed, sample_ids, len(labels))
        pinned = self.denoiser.device.type == "cuda"
        x0 = draw_noise(generators, self.shape, pin_memory=pinned)
        noise = (draw_noise(generators, self.shape, self.steps - 1, pin_memory=pinned)
                 if draws_step_noise(self.sampler, self.eta, self.steps) else None)
        y = model_labels(labels, self.cfg_scale != 1.0, self.denoiser.config.num_classes)
        if self.captured is None:
            self._capture(labels, x0, noise, y)
        else:
            for static, value in ((self.x0, x0), (self.noise, noise), (self.y, y)):
                if static is not None:
                    static.copy_(to_device(value, static.device))
        graph, out, calls, checks = self.captured
        denoiser = self.denoiser
        if graph is None:  # on a CPU: the run itself, eagerly from the buffers
            return self._loop(self._static_run()).clone()
        graph.replay()
        denoiser.checks = list(checks)
        for name, count in calls.items():
            denoiser.calls[name] += count
        return out.clone()

    def _run(self, labels, x0, noise) -> SamplingRun:
        return SamplingRun(self.denoiser, labels, self.steps, self.sampler, self.cfg_scale, x0, 0, self.plan,
                           self.eta, step_noise=noise)

    def _static_run(self) -> SamplingRun:
        """A run reading the static buffers, with the Taylor weights the first run left on the device."""
        run = self._run(self.labels, self.x0, self.noise)
        run.y, run.cache.taylor = self.y, self.taylor
        return run

    def _loop(self, run: SamplingRun) -> torch.Tensor:
        for step in range(self.steps):
            run.step()
            if self.correction is not None:
                run.x = self.correction(step, run.x)
        return run.x

    def _static_buffers(self, labels, x0, noise, y) -> None:
        """The buffers every batch refills (on the device) and the Taylor weights the first run will leave."""
        device = self.denoiser.device
        self.labels, self.x0, self.y = labels, to_device(x0, device), to_device(y, device)
        self.noise = to_device(noise, device) if noise is not None else None
        self.taylor = {}  # every run of this graph shares them: the same plan and steps

    def _capture(self, labels, x0, noise, y) -> None:
        """The first batch: the static buffers; on a GPU an eager run on the engines themselves (compiling and
        autotuning; it leaves each step's Taylor weights on the device), then the capture. Neither counts as engine
        calls of the batch."""
        denoiser, device = self.denoiser, self.denoiser.device
        self._static_buffers(labels, x0, noise, y)
        if device.type != "cuda":
            self.captured = (None, None, None, None)
            return
        calls_before = dict(denoiser.calls)
        denoiser.direct = True  # an engine's own CUDA graph cannot replay inside a capture
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._loop(self._static_run())
            torch.cuda.current_stream().wait_stream(side)
            run, graph = self._static_run(), torch.cuda.CUDAGraph()
            denoiser.start_run()
            with torch.cuda.graph(graph):
                out = self._loop(run)
            self.captured = (graph, out, {name: denoiser.calls[name] - calls_before[name] for name in calls_before},
                             list(denoiser.checks))
        finally:
            denoiser.direct = False
            denoiser.calls.update(calls_before)
            denoiser.start_run()


def nonfinite_samples(images: torch.Tensor) -> torch.Tensor:
    """Which samples (rows) hold a NaN or an Inf: a bool tensor of len(images)."""
    return (~torch.isfinite(images)).flatten(1).any(1)


class EngineDenoiser:
    """The engines behind the denoiser face the sampler drives (tensors on the engines' device). `calls` counts
    the steps of each graph."""

    def __init__(self, manifest: EngineManifest, engines: dict, cuda_graphs: bool = True, fallback=None):
        self.config = manifest.model
        self.branch_names = branch_names(self.config.depth)
        self.graphs = manifest.graphs
        self.device = engines["full"].device
        backend = get_backend(manifest.backend)
        self.direct_engines, self.direct = engines, False  # direct: calls skip the engines' own CUDA graphs
        if cuda_graphs and backend.capabilities.cuda_graphs and self.device.type == "cuda":
            static = set()
            engines = {name: CudaGraphEngine(engine, static) for name, engine in engines.items()}
        self.engines = engines
        # a new batch size means a new CUDA graph capture or compilation
        self.shape_specialised = any(isinstance(e, CudaGraphEngine) or getattr(e, "compiled", False)
                                     for e in engines.values())
        self.calls = dict.fromkeys(self.graphs, 0)
        self.max_batch = backend.batch_limit(manifest)
        self.fallback = fallback
        self.start_run()

    def start_run(self) -> None:
        self.step, self.checks, self.fallback_steps = 0, [], []

    def _finite(self, out: torch.Tensor, engine: str) -> bool:
        """Record this step's check (on the device) or, with a fallback, decide now; True: keep the output."""
        step, self.step = self.step, self.step + 1
        finite = torch.isfinite(out).all()
        if self.fallback is None:
            self.checks.append((step, engine, finite))
            return True
        if bool(finite):
            return True
        self.fallback_steps.append({"step": step, "engine": engine})
        return False

    def nonfinite_steps(self) -> list[dict]:
        """The steps of the current run whose engine output held NaN or Inf (reads the device once)."""
        if not self.checks:
            return []
        flags = torch.stack([finite for _, _, finite in self.checks]).cpu()
        return [{"step": step, "engine": engine} for (step, engine, _), ok in zip(self.checks, flags) if not ok]

    def forward_graph(self, spec, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine of graph `spec` on `feeds`; `out` comes back float32, the cache tensors as the engine
        returns them (bf16 "model" tensors from Inductor engines, factors in the plan's dtype)."""
        if self.graphs.get(spec.name) != spec:
            raise QandcError(f"the plan's {spec.name} graph differs from the one the engines were built with")
        rows = len(feeds["x"])
        if self.max_batch is not None and rows > self.max_batch:
            raise QandcError(f"a batch of {rows} rows (guidance doubles the labels) exceeds the engines' profile of "
                             f"{self.max_batch}; lower --batch-size or rebuild with a larger --max-batch")
        self.calls[spec.name] += 1
        outputs = (self.direct_engines if self.direct else self.engines)[spec.name].infer(feeds)
        if not self._finite(outputs["out"], spec.name):
            outputs = self._recompute(spec, feeds, outputs)
        return {**outputs, "out": outputs["out"].float()}

    def _recompute(self, spec, feeds: dict, engine_outputs: dict) -> dict:
        """The fallback model's outputs of graph `spec` (fed float32 where the engine took its compute dtype), in
        the dtypes of the engine's outputs, so that the next engine takes them as it takes its own."""
        model_dtype = {t.name for t in spec.inputs if t.dtype == "model"}
        float_feeds = {n: v.float() if n in model_dtype else v for n, v in feeds.items()}
        with torch.no_grad():
            outputs = self.fallback.forward_graph(spec, float_feeds)
        return {n: outputs[n].to(engine_outputs[n].dtype) for n in spec.output_names}


class Pipeline:
    """A denoiser with its cache plan, VC table and sampler defaults: `Pipeline.load(engine_dir)` runs the engines,
    `Pipeline.from_model(model, plan)` a plain or fake-quant PyTorch model. `generate(labels, seed)`: samples in the
    model's output space."""

    def __init__(self, denoiser, plan: CachePlan, vc: torch.Tensor | None = None,
                 sampler_defaults: SamplerDefaults | None = None, manifest: EngineManifest | None = None,
                 name: str = "the engines"):
        self.denoiser, self.plan, self.vc, self.manifest, self.name = denoiser, plan, vc, manifest, name
        self.sampler_defaults = sampler_defaults or SamplerDefaults()
        self.last_run = None
        self.load_seconds = None  # Pipeline.load: how long loading the engines (and the fallback model) took
        self.run_graphs: dict | None = None  # Pipeline.load(run_graphs=True): a RunGraph per shape and setting

    @classmethod
    def load(cls, folder: str | Path, compile: bool = True, cuda_graphs: bool = True,
             fallback: bool = False, run_graphs: bool = False) -> "Pipeline":
        """`compile` / `cuda_graphs`: Inductor engines on a GPU only (False for eager runs and comparisons).
        `fallback`: load the float model of the checkpoint the engines were built from, to recompute steps whose
        engine output is not finite. `run_graphs`: each batch shape and setting samples as one CUDA graph of the
        whole run (`RunGraph`; not with `fallback`, which decides step by step)."""
        if run_graphs and fallback:
            raise QandcError("whole-run graphs and the NaN fallback exclude each other: the fallback decides step "
                             "by step")
        started = time.perf_counter()
        manifest, engines = load_engines(folder, compile)
        model = None
        if fallback:  # the checkpoint's sha256 verified, loaded with the manifest's model config
            model = manifest.checkpoint_model(folder).to(engines["full"].device).eval()
        pipeline = cls(EngineDenoiser(manifest, engines, cuda_graphs, model), manifest.plan, manifest.vc_table,
                       manifest.sampler, manifest)
        pipeline.run_graphs = {} if run_graphs else None
        pipeline.load_seconds = time.perf_counter() - started
        return pipeline

    @classmethod
    def from_model(cls, model, plan: CachePlan | None = None, vc: torch.Tensor | None = None,
                   sampler_defaults: SamplerDefaults | None = None, name: str = "the model") -> "Pipeline":
        """A PyTorch DiT (plain or fake quant) as the denoiser, with its cache plan (default none) and VC table;
        `name` says what it is in error messages."""
        return cls(model, plan or CachePlan.none(), vc, sampler_defaults, name=name)

    @classmethod
    def from_recipe(cls, model, recipe_dir: str | Path, use_vc: bool = True, device=None) -> "Pipeline":
        """A float DiT with a recipe applied (ModelOpt fake quant), on `device`: the recipe's cache plan, VC table
        (unless `use_vc` is False) and sampler defaults."""
        from ..calibration import apply_recipe
        from ..formats.recipe import load_vc

        model, recipe = apply_recipe(model, recipe_dir)
        return cls.from_model(model.to(device) if device is not None else model, recipe.cache_plan,
                              load_vc(recipe_dir) if use_vc else None, recipe.sampler_defaults,
                              name="the model with the recipe")

    @property
    def config(self) -> DiTConfig:
        return self.denoiser.config

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def runs_engines(self) -> bool:
        return isinstance(self.denoiser, EngineDenoiser)

    @property
    def shape_specialised(self) -> bool:
        """Whether each new batch size compiles or captures again (Inductor engines on a GPU)."""
        return self.runs_engines and self.denoiser.shape_specialised

    def generate(self, labels, seed: int | Sequence[int], steps: int | None = None, sampler: str | None = None,
                 cfg_scale: float | None = None, sample_ids=None, use_vc: bool = True,
                 progress: bool = False, eta: float = 0.0, allow_nonfinite: bool = False) -> torch.Tensor:
        """Samples for `labels` (sample i's noise keyed by (seed, sample_ids[i]), or by (seed[i], sample_ids[i])
        given a seed per sample). Non-finite samples are a QandcError unless `allow_nonfinite` (a server that fails
        only the requests whose samples are not finite); with the engines, `last_run` then holds the steps each
        graph took."""
        defaults = self.sampler_defaults
        steps = steps or defaults.steps
        correction = vc_correction(self.vc, steps, self.name, self.config.in_channels) if use_vc else None
        sampler, cfg_scale = sampler or defaults.sampler, defaults.cfg_scale if cfg_scale is None else cfg_scale
        if self.runs_engines:
            calls = dict(self.denoiser.calls)
            self.denoiser.start_run()
        if self.run_graphs is not None:
            key = (len(labels), steps, sampler, cfg_scale, eta, use_vc)
            if key not in self.run_graphs:
                self.run_graphs[key] = RunGraph(self.denoiser, steps, sampler, cfg_scale, eta, self.plan, correction)
            images = self.run_graphs[key].sample(labels, seed, sample_ids)
        else:
            images = sample(self.denoiser, labels, steps, sampler, cfg_scale, seed=seed, plan=self.plan, eta=eta,
                            correction=correction, sample_ids=sample_ids, progress=progress)
        if self.runs_engines:
            self._check_engine_run(calls, steps, allow_nonfinite)
        elif not allow_nonfinite and nonfinite_samples(images).any():  # never return a black image silently
            ids = list(range(len(images)) if sample_ids is None else sample_ids)
            bad = int(nonfinite_samples(images).sum())
            raise QandcError(f"{bad} of the samples {ids[0]}..{ids[-1]} are not finite (NaN / Inf): {self.name} "
                             "overflowed")
        return images

    def _check_engine_run(self, calls_before: dict, steps: int, allow_nonfinite: bool = False) -> None:
        """Record the run's step counts in `last_run` (`graphs`: the steps of each graph; `full`, `reuse`: the full
        steps and those of every reuse graph together); unless `allow_nonfinite`, fail naming the steps whose engine
        output was not finite."""
        graphs = {name: self.denoiser.calls[name] - calls_before[name] for name in calls_before}
        self.last_run = {"full": graphs["full"], "reuse": sum(graphs.values()) - graphs["full"], "graphs": graphs,
                         "fallback_steps": self.denoiser.fallback_steps}
        bad = [] if allow_nonfinite else self.denoiser.nonfinite_steps()
        if bad:
            where = ", ".join(f"step {b['step']} ({b['engine']} engine)" for b in bad[:5])
            raise QandcError(f"non-finite engine outputs at {len(bad)} of {steps} steps: {where}"
                             f"{' ...' if len(bad) > 5 else ''}; generate --nan-fallback recomputes such steps "
                             "with the float model")
