"""`sample`: DDPM / DDIM with classifier-free guidance under a cache plan, with per-sample noise keying.

The sampler drives any *denoiser* with the face of `qandc.model.DiT`: `config` (a DiTConfig), `device`,
`branch_names` and `forward_graph(spec, feeds) -> outputs`, which runs one engine graph of the cache plan
(`qandc.model.graphs`: the full graph, or a reuse graph) on tensors by name; `qandc.runtime` drives engines through
the same face. Between steps the sampler carries the graphs' cache tensors (`BranchCache`).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from ..progress import progress as progress_bar

from ..errors import QandcError
from ..model.dit import guide
from ..model.forecast import TORCH_FACTOR_DTYPES
from ..model.graphs import engine_graphs
from .cache import BranchCache, to_device
from .diffusion import Diffusion
from .plan import CachePlan

SAMPLERS = ("ddpm", "ddim")
NOISE_CHUNK = 8  # steps whose noise is drawn at once
NOISE_AHEAD = 2  # chunks drawn ahead of the sampling
# a draw of this many values or more is spread over threads (64 samples x 49 steps of 4x16x16 took 17 ms on one core)
PARALLEL_DRAW_VALUES = 1 << 18
DRAW_THREADS = max(1, min(8, (os.cpu_count() or 1) - 1))

# correction(step_index, x) -> x, applied after every sampling step (variance compensation plugs in here)
Correction = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerDefaults:
    """The sampler settings an artifact was made for (a recipe's calibration, an engine set's defaults)."""

    steps: int = 50
    sampler: str = "ddpm"
    cfg_scale: float = 1.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerDefaults":
        if not isinstance(data, dict) or set(data) != {"steps", "sampler", "cfg_scale"}:
            raise QandcError("sampler settings: expected an object with steps, sampler and cfg_scale")
        if not isinstance(data["steps"], int) or isinstance(data["steps"], bool) or data["steps"] < 1 \
                or data["sampler"] not in SAMPLERS or not isinstance(data["cfg_scale"], (int, float)) \
                or isinstance(data["cfg_scale"], bool) or not math.isfinite(data["cfg_scale"]):
            raise QandcError(f"sampler settings: not valid ({data})")
        return cls(**data)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index` under `seed`: its initial noise and every step's noise come from it."""
    key = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key) & (2 ** 63 - 1))


def draw_noise(generators: list[torch.Generator], shape, count: int | None = None,
               pin_memory: bool = False) -> torch.Tensor:
    """One standard-normal draw of `shape` from each sample's generator, stacked (CPU); with `count`, that many
    successive draws at once (n, count, *shape). torch's CPU normal fills 16 values at a time, so for shapes of a
    multiple of 16 values one draw of count x shape gives the successive draws' numbers (tests/test_sampling.py
    checks it); other shapes are drawn one by one. Each sample is drawn straight into its slice of the result (no
    stacking: a large stack is a parallel copy, whose idle OpenMP teams spin on every core). Many values are drawn
    on DRAW_THREADS threads, each drawing a share of the samples from their own generators (torch's random calls
    leave Python's lock): the same numbers as one thread draws. `pin_memory`: drawn into pinned memory (a CUDA
    call: not on a thread beside a CUDA graph capture), which copies to a GPU without a staging copy."""
    out = torch.empty((len(generators), *(() if count is None else (count,)), *shape), pin_memory=pin_memory)

    def draw(part: range) -> None:
        for i in part:
            if count is None or math.prod(shape) % 16 == 0:
                torch.randn(out.shape[1:], generator=generators[i], out=out[i])
            else:
                for j in range(count):
                    torch.randn(shape, generator=generators[i], out=out[i, j])

    values = out.numel()
    if values < PARALLEL_DRAW_VALUES or min(len(generators), DRAW_THREADS) < 2:
        draw(range(len(generators)))
    else:
        share = -(-len(generators) // DRAW_THREADS)
        list(_draw_pool().map(draw, [range(i, min(i + share, len(generators)))
                                     for i in range(0, len(generators), share)]))
    return out


_DRAW_POOL: list[ThreadPoolExecutor] = []


def _draw_pool() -> ThreadPoolExecutor:
    if not _DRAW_POOL:
        _DRAW_POOL.append(ThreadPoolExecutor(DRAW_THREADS, thread_name_prefix="qandc-draw"))
    return _DRAW_POOL[0]


class NoiseStream:
    """Every step's noise from the samples' generators, drawn NOISE_CHUNK steps at a time on a background thread,
    NOISE_AHEAD chunks ahead of the step that needs it. Drawing is host work (about 10 ms for 8 steps of 250
    samples of 4x16x16 on one core), longer than 8 cached steps take on an H200: drawn on the sampling thread it
    made the GPU wait (DDPM at 0.40 of the compute ran at 1.2x the uncached images/s where DDIM at 0.26 ran at 3.1x).
    One thread draws, so each generator's draws stay in order; the sampling thread copies each chunk to the device
    through pinned memory."""

    def __init__(self, generators: list[torch.Generator], shape, draws: int, device):
        self.generators, self.shape, self.draws, self.device = generators, shape, draws, torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qandc-noise")
        self.pending = {}  # first step of a chunk -> its future
        self.chunk, self.chunk_from = None, 0
        for first in range(0, NOISE_AHEAD * NOISE_CHUNK, NOISE_CHUNK):
            self._submit(first)

    def _submit(self, first: int) -> None:
        if first < self.draws:  # CPU work only: a CUDA call here could meet a graph capture on the sampling thread
            self.pending[first] = self.pool.submit(draw_noise, self.generators, self.shape,
                                                   min(NOISE_CHUNK, self.draws - first))

    def take(self, step: int) -> torch.Tensor:
        """Step `step`'s noise on the device (steps are taken in order, 0 .. draws - 1)."""
        if self.chunk is None or step >= self.chunk_from + self.chunk.shape[1]:
            self.chunk_from = step
            self.chunk = to_device(self.pending.pop(step).result(), self.device)
            self._submit(step + NOISE_AHEAD * NOISE_CHUNK)
            if not self.pending:
                self.pool.shutdown(wait=False)
        return self.chunk[:, step - self.chunk_from]


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """Labels as a 1-D long tensor; each must be a real class (the null class is internal to guidance)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise QandcError("no labels given")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise QandcError(f"label {int(bad[0])} is out of range: the model has classes 0..{num_classes - 1}")
    return labels


def sample_generators(seed: int | Sequence[int] | None, sample_ids, n: int) -> list[torch.Generator]:
    """Each sample's generator, keyed by (seed, sample_ids[i]) or, given a seed per sample, (seed[i],
    sample_ids[i]); ids default to 0..n-1, a missing seed to a fresh one."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 32) if seed is None else seed
    seeds = [seed] * n if np.ndim(seed) == 0 else list(seed)  # one seed per sample: a batch of requests
    sample_ids = range(n) if sample_ids is None else sample_ids
    if len(sample_ids) != n or len(seeds) != n:
        raise QandcError(f"{len(sample_ids)} sample ids and {len(seeds)} seeds for {n} labels")
    return [sample_generator(int(s), int(i)) for s, i in zip(seeds, sample_ids)]


def model_labels(labels: torch.Tensor, guided: bool, num_classes: int) -> torch.Tensor:
    """The class labels the model sees: with guidance the batch again with the null class."""
    return torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels


def draws_step_noise(sampler: str, eta: float, steps: int) -> bool:
    """Whether the steps draw noise (DDPM, or DDIM with eta > 0): steps - 1 draws a sample after its initial one."""
    return (sampler == "ddpm" or eta > 0) and steps > 1


class StepNoise:
    """Every step's noise already on the device (n, draws, *shape): what a whole-run CUDA graph reads."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def take(self, step: int) -> torch.Tensor:
        return self.noise[:, step]


class SamplingRun:
    """One DDPM / DDIM trajectory of a batch, advanced a step at a time: `x` is the current sample. `sample` drives
    it to the end; VC fitting drives two runs in lockstep (same noise keys) and moves `x` between them.
    `step_noise`: every step's noise on the device (draws_step_noise's count), instead of drawing it from the
    samples' generators as the run goes."""

    def __init__(self, model, labels, steps: int, sampler: str = "ddpm", cfg_scale: float = 1.0, noise=None,
                 seed: int | Sequence[int] | None = None, plan: CachePlan | None = None, eta: float = 0.0,
                 sample_ids=None, step_noise: torch.Tensor | None = None):
        config = model.config
        if sampler not in SAMPLERS:
            raise QandcError(f"unknown sampler {sampler!r}; choose {' or '.join(SAMPLERS)}")
        self.labels = check_labels(labels, config.num_classes)
        n = len(self.labels)
        self.model, self.sampler, self.cfg_scale, self.eta = model, sampler, cfg_scale, eta
        self.diffusion = Diffusion(steps, learn_sigma=config.learn_sigma)
        self.plan = plan or CachePlan.none()
        self.step_graphs = self.plan.step_graphs(steps)
        self.graphs = engine_graphs(self.plan, model.branch_names)
        self.device = model.device
        self.shape = (config.in_channels, config.input_size, config.input_size)
        self.generators = sample_generators(seed, sample_ids, n)
        if noise is None:
            x = draw_noise(self.generators, self.shape)
        else:
            x = torch.as_tensor(noise, dtype=torch.float32)
            if tuple(x.shape) != (n, *self.shape):
                raise QandcError(f"noise has shape {tuple(x.shape)}, expected {(n, *self.shape)}")
        self.x = to_device(x, self.device)
        if not draws_step_noise(sampler, eta, steps):
            self.noise = None
        elif step_noise is not None:
            self.noise = StepNoise(step_noise)
        else:
            self.noise = NoiseStream(self.generators, self.shape, steps - 1, self.device)
        self.guided = cfg_scale != 1.0
        self.y = to_device(model_labels(self.labels, self.guided, config.num_classes), self.device)
        tokens = (config.input_size // config.patch_size) ** 2
        self.cache = BranchCache(self.plan.forecast, TORCH_FACTOR_DTYPES[self.plan.factors],
                                 (tokens, config.hidden_size), self.device)
        self.step_index = 0

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Advance one sampling step (the plan's graph for it); return the new x."""
        step, n, config = self.step_index, len(self.labels), self.model.config
        index = self.diffusion.num_steps - 1 - step
        x_in = torch.cat([self.x, self.x]) if self.guided else self.x
        t = self.diffusion.model_timesteps(index, len(x_in), self.device)
        spec = self.graphs[self.step_graphs[step]]
        outputs = self.model.forward_graph(spec, {"x": x_in, "t": t, "y": self.y,
                                                  **self.cache.feeds(spec, step, len(x_in))})
        self.cache.store(spec, step, outputs)
        out = outputs["out"]
        if self.guided:
            out = guide(out, self.cfg_scale, config)[:n]
        noise = self.noise.take(step) if index > 0 and self.noise else None
        if self.sampler == "ddpm":
            self.x = self.diffusion.ddpm_step(out, self.x, index, noise)
        else:
            self.x = self.diffusion.ddim_step(out, self.x, index, noise, self.eta)
        self.step_index += 1
        return self.x


@torch.no_grad()
def sample(model, labels, steps: int, sampler: str = "ddpm", cfg_scale: float = 1.0, noise=None,
           seed: int | Sequence[int] | None = None, plan: CachePlan | None = None, eta: float = 0.0,
           correction: Correction | None = None, sample_ids=None, progress: bool = False) -> torch.Tensor:
    """Final samples, one per label, in the model's output space (float32, on the model's device).

    Sample i's noise comes from a generator keyed by (seed, sample_ids[i]) (default ids 0..n-1), so it does not
    depend on batch size or position; `seed` may be a list, one per sample (a batch that merges requests).
    `noise`, when given, replaces the initial noise (one row per label). `cfg_scale=1.0` runs the plain model;
    otherwise the batch is doubled with the null class. `plan` defaults to no cache."""
    run = SamplingRun(model, labels, steps, sampler, cfg_scale, noise, seed, plan, eta, sample_ids)
    for step in progress_bar(range(run.diffusion.num_steps), "sampling", enabled=progress):
        run.step()
        if correction is not None:
            run.x = correction(step, run.x)
    return run.x
