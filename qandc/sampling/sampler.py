"""`sample`: DDPM / DDIM with classifier-free guidance under a cache plan, with per-sample noise keying.

The sampler drives any *denoiser* with the face of `qandc.model.DiT`: `config` (a DiTConfig), `branch_names`,
`forward_full(x, t, y, branches, regate) -> (out, cache)` and `forward_reuse(x, t, y, cache, regate) -> out`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import QandcError
from ..model.dit import guide
from .diffusion import Diffusion
from .plan import CachePlan

SAMPLERS = ("ddpm", "ddim")

# correction(step_index, x) -> x, applied after every sampling step (variance compensation plugs in here)
Correction = Callable[[int, torch.Tensor], torch.Tensor]


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index` under `seed`: its initial noise and every step's noise come from it."""
    key = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key) & (2 ** 63 - 1))


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """Labels as a 1-D long tensor; each must be a real class (the null class is internal to guidance)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise QandcError("no labels given")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise QandcError(f"label {int(bad[0])} is out of range: the model has classes 0..{num_classes - 1}")
    return labels


@torch.no_grad()
def sample(model, labels, steps: int, sampler: str = "ddpm", cfg_scale: float = 1.0, noise=None,
           seed: int | None = None, plan: CachePlan | None = None, eta: float = 0.0,
           correction: Correction | None = None, first_index: int = 0, progress: bool = False) -> torch.Tensor:
    """Final samples, one per label, in the model's output space (float32, on the model's device).

    Sample i's noise comes from a generator keyed by (seed, first_index + i), so it does not depend on batch size
    or position. `noise`, when given, replaces the initial noise (one row per label). `cfg_scale=1.0` runs the
    plain model; otherwise the batch is doubled with the null class. `plan` defaults to no cache."""
    config = model.config
    if sampler not in SAMPLERS:
        raise QandcError(f"unknown sampler {sampler!r}; choose {' or '.join(SAMPLERS)}")
    labels = check_labels(labels, config.num_classes)
    n = len(labels)
    diffusion = Diffusion(steps, learn_sigma=config.learn_sigma)
    plan = plan or CachePlan.none()
    full_steps = plan.full_steps(steps)
    reuse_set = plan.reuse_set(model.branch_names)
    device = next(model.parameters()).device
    shape = (config.in_channels, config.input_size, config.input_size)
    seed = int(np.random.SeedSequence().entropy % 2 ** 32) if seed is None else seed
    generators = [sample_generator(seed, first_index + i) for i in range(n)]
    if noise is None:
        x = torch.stack([torch.randn(shape, generator=g) for g in generators])
    else:
        x = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(x.shape) != (n, *shape):
            raise QandcError(f"noise has shape {tuple(x.shape)}, expected {(n, *shape)}")
    x = x.to(device)
    guided = cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
    y = y.to(device)
    cache = None
    for step in tqdm(range(diffusion.num_steps), desc="sampling", disable=not progress, leave=False):
        index = diffusion.num_steps - 1 - step
        x_in = torch.cat([x, x]) if guided else x
        t = diffusion.model_timesteps(index, len(x_in), device)
        if full_steps[step]:
            out, cache = model.forward_full(x_in, t, y, branches=reuse_set, regate=plan.regate)
        else:
            out = model.forward_reuse(x_in, t, y, cache, regate=plan.regate)
        if guided:
            out = guide(out, cfg_scale, config)[:n]
        needs_noise = index > 0 and (sampler == "ddpm" or eta > 0)
        step_noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device) \
            if needs_noise else None
        if sampler == "ddpm":
            x = diffusion.ddpm_step(out, x, index, step_noise)
        else:
            x = diffusion.ddim_step(out, x, index, step_noise, eta)
        if correction is not None:
            x = correction(step, x)
    return x
