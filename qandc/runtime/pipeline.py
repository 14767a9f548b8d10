"""The runtime: loads an engine directory (or takes a PyTorch model) and samples with the one DDPM / DDIM
implementation of `qandc.sampling`, through an adapter that gives the engines the denoiser face. Full steps run the
full engine (which also returns the cache tensors), reuse steps the reuse engine fed the kept cache; VC is applied
after every step; the run reports how many steps took each path (a cache that never fires is visible). Engines on a
GPU that accept it (Inductor) run each call as a replayed CUDA graph, one per batch size.

NaN / Inf guard: every engine output is checked. By default ("check") the checks stay on the device and are read
once after the run, which then fails with the steps and engines that produced non-finite values (no black images
pass silently, and no per-step synchronisation slows the run); with a high-precision `fallback` model ("fallback")
each step is checked as it runs and a non-finite one is recomputed by the fallback model, and the run reports it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..engines import get_backend, load_engines
from ..errors import QandcError
from ..formats.manifest import EngineManifest
from ..formats.recipe import vc_correction
from ..model.dit import DiTConfig, branch_names
from ..sampling import CachePlan, SamplerDefaults, sample


class CudaGraphEngine:
    """An engine whose calls are captured once per input shapes as a CUDA graph and replayed. Inputs are copied
    into the graph's static buffers, except those that already are static outputs of a graph sharing
    `static_outputs`: the reuse engine reads the full engine's cache outputs in place. Outputs are the graph's
    static buffers, overwritten by its next replay."""

    def __init__(self, engine, static_outputs: set):
        self.engine, self.static_outputs = engine, static_outputs
        self.input_names, self.device = engine.input_names, engine.device
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
        return outputs

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


class EngineDenoiser:
    """The engines behind the denoiser face the sampler drives (tensors on the engines' device)."""

    def __init__(self, manifest: EngineManifest, engines: dict, cuda_graphs: bool = True, fallback=None):
        self.config = manifest.model
        self.branch_names = branch_names(self.config.depth)
        self.cache_inputs = manifest.cache_inputs
        self.device = engines["full"].device
        backend = get_backend(manifest.backend)
        if cuda_graphs and backend.capabilities.cuda_graphs and self.device.type == "cuda":
            static = set()
            engines = {name: CudaGraphEngine(engine, static) for name, engine in engines.items()}
        self.engines = engines
        self.calls = {"full": 0, "reuse": 0}
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

    def _feeds(self, x, t, y):
        if self.max_batch is not None and len(x) > self.max_batch:
            raise QandcError(f"a batch of {len(x)} rows (guidance doubles the labels) exceeds the engines' "
                             f"profile of {self.max_batch}; lower --batch-size or rebuild with a larger --max-batch")
        return {"x": x.float(), "t": t.long(), "y": y.long()}

    def forward_full(self, x, t, y, branches=None, regate=False):
        if branches is not None and list(branches) != self.cache_inputs:
            raise QandcError("the plan's reuse set differs from the one the engines were built with")
        self.calls["full"] += 1
        out = self.engines["full"].infer(self._feeds(x, t, y))
        if self._finite(out["out"], "full"):
            return out["out"].float(), {b: out[b] for b in self.cache_inputs}
        return self.fallback.forward_full(x, t, y, branches=self.cache_inputs, regate=regate)

    def forward_reuse(self, x, t, y, cache, regate=False):
        self.calls["reuse"] += 1
        out = self.engines["reuse"].infer({**self._feeds(x, t, y), **cache})["out"]
        if self._finite(out, "reuse"):
            return out.float()
        return self.fallback.forward_reuse(x, t, y, {b: c.float() for b, c in cache.items()}, regate=regate)


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

    @classmethod
    def load(cls, folder: str | Path, compile: bool = True, cuda_graphs: bool = True,
             fallback: bool = False) -> "Pipeline":
        """`compile` / `cuda_graphs`: Inductor engines on a GPU only (False for eager runs and comparisons).
        `fallback`: load the float model of the checkpoint the engines were built from, to recompute steps whose
        engine output is not finite."""
        manifest, engines = load_engines(folder, compile)
        model = None
        if fallback:  # the checkpoint's sha256 verified, loaded with the manifest's model config
            model = manifest.checkpoint_model(folder).to(engines["full"].device).eval()
        return cls(EngineDenoiser(manifest, engines, cuda_graphs, model), manifest.plan, manifest.vc_table,
                   manifest.sampler, manifest)

    @classmethod
    def from_model(cls, model, plan: CachePlan | None = None, vc: torch.Tensor | None = None,
                   sampler_defaults: SamplerDefaults | None = None, name: str = "the model") -> "Pipeline":
        """A PyTorch DiT (plain or fake quant) as the denoiser, with its cache plan (default none) and VC table;
        `name` says what it is in error messages."""
        return cls(model, plan or CachePlan.none(), vc, sampler_defaults, name=name)

    @property
    def config(self) -> DiTConfig:
        return self.denoiser.config

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def runs_engines(self) -> bool:
        return isinstance(self.denoiser, EngineDenoiser)

    def generate(self, labels, seed: int, steps: int | None = None, sampler: str | None = None,
                 cfg_scale: float | None = None, sample_ids=None, use_vc: bool = True,
                 progress: bool = False, eta: float = 0.0) -> torch.Tensor:
        """Samples for `labels` (sample i's noise keyed by (seed, sample_ids[i])). Non-finite samples are a
        QandcError; with the engines, `last_run` then holds the steps each path took."""
        defaults = self.sampler_defaults
        steps = steps or defaults.steps
        correction = vc_correction(self.vc, steps, self.name, self.config.in_channels) if use_vc else None
        if self.runs_engines:
            calls = dict(self.denoiser.calls)
            self.denoiser.start_run()
        images = sample(self.denoiser, labels, steps, sampler or defaults.sampler,
                        defaults.cfg_scale if cfg_scale is None else cfg_scale, seed=seed, plan=self.plan,
                        eta=eta, correction=correction, sample_ids=sample_ids, progress=progress)
        if self.runs_engines:
            self._check_engine_run(calls, steps)
        elif not torch.isfinite(images).all():  # never return a black image silently
            ids = list(range(len(images)) if sample_ids is None else sample_ids)
            bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
            raise QandcError(f"{bad} of the samples {ids[0]}..{ids[-1]} are not finite (NaN / Inf): {self.name} "
                             "overflowed")
        return images

    def _check_engine_run(self, calls_before: dict, steps: int) -> None:
        """Record the run's step counts in `last_run`; fail naming the steps whose engine output was not finite."""
        self.last_run = {path: self.denoiser.calls[path] - calls_before[path] for path in calls_before}
        self.last_run["fallback_steps"] = self.denoiser.fallback_steps
        bad = self.denoiser.nonfinite_steps()
        if bad:
            where = ", ".join(f"step {b['step']} ({b['engine']} engine)" for b in bad[:5])
            raise QandcError(f"non-finite engine outputs at {len(bad)} of {steps} steps: {where}"
                             f"{' ...' if len(bad) > 5 else ''}; generate --nan-fallback recomputes such steps "
                             "with the float model")
