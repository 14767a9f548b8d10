"""VC — variance compensation between steps (method.md §5; close to TAC-Diffusion, ECCV 2024).

Per sampling step s and channel c, x̃ = μ + K[s, c] (x̂ − μ), μ the per-sample, per-channel spatial mean of the
quantized + cached sample x̂. K is the closed-form weighted least-squares fit of the centred quantized sample onto
the centred full-precision reference x' (same labels and every noise draw shared):
    K[s, c] = Σ w a b / Σ w a²,  a = x̂ − μ,  b = x' − μ,
with w = 1 ("mse") or w = 1 + 1 / max(x'², ε²) ("nsr", the noise-to-signal-weighted form). It is fitted step by
step in sampling order inside the quantized run's correction hook, so every factor sees the earlier corrections.
"""

from __future__ import annotations

import torch

from ..formats.recipe import VarianceCompensation
from ..progress import progress
from ..sampling import SamplingRun

VC_FORMS = ("mse", "nsr", "var")
NSR_EPS = 1e-2


def fit_factor(x_hat: torch.Tensor, x_ref: torch.Tensor, form: str = "mse", eps: float = NSR_EPS) -> torch.Tensor:
    """K for one step: (C,) from quantized samples x_hat and reference samples x_ref, both (N, C, H, W)."""
    mu = x_hat.mean(dim=(2, 3), keepdim=True)
    a, b = (x_hat - mu).double(), (x_ref - mu).double()
    if form == "var":  # variance matching: the spread of the reference, whatever the pairing
        b = x_ref.double() - x_ref.double().mean(dim=(2, 3), keepdim=True)
        return (b.pow(2).sum(dim=(0, 2, 3)) / a.pow(2).sum(dim=(0, 2, 3)).clamp(min=1e-30)).sqrt().float()
    w = torch.ones_like(a) if form == "mse" else 1 + 1 / x_ref.double().pow(2).clamp(min=eps ** 2)
    return ((w * a * b).sum(dim=(0, 2, 3)) / (w * a * a).sum(dim=(0, 2, 3)).clamp(min=1e-30)).float()


def fit_vc(fp_model, q_model, labels, steps: int, sampler: str, cfg_scale: float, seed: int, plan,
           form: str = "var", eps: float = NSR_EPS) -> torch.Tensor:
    """K (steps x channels), fitted in sampling order and applied to the quantized run under `plan` (its cached
    branches reused or forecast, as in generation) before its next step; both runs share labels and every noise
    draw. "var": the reference is the full-precision, uncached
    trajectory. "mse" / "nsr": the reference of each step is one full-precision, uncached step from the quantized
    run's own corrected sample (see the module docstring for why)."""
    one_step = form != "var"
    q_run = SamplingRun(q_model, labels, steps, sampler, cfg_scale, seed=seed, plan=plan)
    fp_run = SamplingRun(fp_model, labels, steps, sampler, cfg_scale, seed=seed)
    factors = []
    for step in progress(range(steps), "VC fit"):
        if one_step:
            fp_run.x = q_run.x
        x_hat, x_ref = q_run.step(), fp_run.step()
        factors.append(fit_factor(x_hat, x_ref, form, eps).cpu())
        q_run.x = VarianceCompensation(factors[-1][None])(0, x_hat)
    return torch.stack(factors)
