"""The original DiT diffusion: linear betas over 1000 steps, respacing, learned-sigma DDPM and DDIM steps.

Coefficients are computed in float64 (numpy) and applied as float32 scalars, as the original code does. The model
always receives the original timesteps (0..999) through the respacing map.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import QandcError
from ..model.checkpoint import TRAINING_SCHEDULE

TRAIN_STEPS = TRAINING_SCHEDULE["num_train_timesteps"]


def linear_betas(num_steps: int = TRAIN_STEPS) -> np.ndarray:
    scale = 1000 / num_steps
    start, end = TRAINING_SCHEDULE["beta_start"], TRAINING_SCHEDULE["beta_end"]
    return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The original `space_timesteps` in its plain "N" form: `count` evenly strided steps, Python rounding."""
    if not 1 <= count <= num_timesteps:
        raise QandcError(f"steps must be between 1 and {num_timesteps}, got {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    position, steps = 0.0, set()
    for _ in range(count):  # accumulated, not multiplied: the original's float rounding decides ties
        steps.add(round(position))
        position += stride
    return sorted(steps)


def _f32(value) -> float:
    """A coefficient as the float32 scalar the original extracts."""
    return float(np.float32(value))


class Diffusion:
    """A respaced Gaussian diffusion with `num_steps` sampling steps (index 0 = least noisy)."""

    def __init__(self, num_steps: int, learn_sigma: bool = True):
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas())
        self.timestep_map = space_timesteps(TRAIN_STEPS, num_steps)
        last, betas = 1.0, []
        for t in self.timestep_map:
            betas.append(1 - base_alphas_cumprod[t] / last)
            last = base_alphas_cumprod[t]
        self.num_steps = len(betas)
        self.learn_sigma = learn_sigma
        self.betas = betas = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # log of the posterior variance, clipped: it is 0 at the first step
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:])) \
            if len(betas) > 1 else np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
        # fixed variance when sigma is not learned: the original's FIXED_LARGE
        self.fixed_log_variance = np.log(np.append(posterior_variance[1], betas[1:])) \
            if len(betas) > 1 else np.log(betas)

    def model_timesteps(self, index: int, batch: int, device) -> torch.Tensor:
        """The original timestep the model sees at sampling-step `index`, for a whole batch."""
        return torch.full((batch,), self.timestep_map[index], dtype=torch.long, device=device)

    def _pred_xstart(self, eps, x, index):
        return _f32(self.sqrt_recip_alphas_cumprod[index]) * x - _f32(self.sqrt_recipm1_alphas_cumprod[index]) * eps

    def _log_variance(self, model_out, x, index):
        if not self.learn_sigma:
            return torch.full_like(x, _f32(self.fixed_log_variance[index]))
        frac = (model_out[:, x.shape[1]:] + 1) / 2  # learned range between the two fixed variances
        min_log, max_log = _f32(self.posterior_log_variance_clipped[index]), _f32(np.log(self.betas[index]))
        return frac * max_log + (1 - frac) * min_log

    def ddpm_step(self, model_out, x, index, noise):
        """One ancestral (p_sample) step; no noise at the last step (index 0)."""
        pred_xstart = self._pred_xstart(model_out[:, :x.shape[1]], x, index)
        mean = _f32(self.posterior_mean_coef1[index]) * pred_xstart + _f32(self.posterior_mean_coef2[index]) * x
        if index == 0:
            return mean
        return mean + torch.exp(0.5 * self._log_variance(model_out, x, index)) * noise

    def ddim_step(self, model_out, x, index, noise, eta: float = 0.0):
        """One DDIM step; `noise` is used only when eta > 0."""
        pred_xstart = self._pred_xstart(model_out[:, :x.shape[1]], x, index)
        eps = (_f32(self.sqrt_recip_alphas_cumprod[index]) * x - pred_xstart) \
            / _f32(self.sqrt_recipm1_alphas_cumprod[index])
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[index], self.alphas_cumprod_prev[index]
        sigma = eta * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = pred_xstart * _f32(np.sqrt(alpha_bar_prev)) + _f32(np.sqrt(1 - alpha_bar_prev - sigma ** 2)) * eps
        if index == 0 or eta == 0:
            return mean
        return mean + _f32(sigma) * noise

    # training (the original `training_losses` with learned range variance: MSE on eps + the VLB term)
    def _gather(self, arr, t: torch.Tensor, ndim: int) -> torch.Tensor:
        values = torch.as_tensor(np.asarray(arr), device=t.device)[t].float()
        return values.reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x_start, t, noise):
        """Diffuse clean data to step t (t indexes this diffusion's steps)."""
        ac = self._gather(self.alphas_cumprod, t, x_start.ndim)
        return ac.sqrt() * x_start + (1 - ac).sqrt() * noise

    def training_losses(self, model_out, x_start, x_t, t, noise) -> torch.Tensor:
        """Per-sample loss: MSE(eps) + the variational bound term (in bits/dim) on the learned variance, which
        sees the eps prediction detached, as in the original DiT (ADM) code."""
        c, n = x_t.shape[1], x_t.ndim
        eps, var_values = model_out[:, :c], model_out[:, c:]
        mse = ((noise - eps.float()) ** 2).mean(dim=tuple(range(1, n)))
        if not self.learn_sigma:
            return mse
        g = lambda arr: self._gather(arr, t, n)  # noqa: E731
        pred_xstart = (g(self.sqrt_recip_alphas_cumprod) * x_t
                       - g(self.sqrt_recipm1_alphas_cumprod) * eps.detach().float())
        model_mean = g(self.posterior_mean_coef1) * pred_xstart + g(self.posterior_mean_coef2) * x_t
        frac = (var_values.float() + 1) / 2
        model_log_var = frac * g(np.log(self.betas)) + (1 - frac) * g(self.posterior_log_variance_clipped)
        true_mean = g(self.posterior_mean_coef1) * x_start + g(self.posterior_mean_coef2) * x_t
        true_log_var = g(self.posterior_log_variance_clipped)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.mean(dim=tuple(range(1, n))) / np.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)
        nll = nll.mean(dim=tuple(range(1, n))) / np.log(2.0)
        return mse + torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 8 bits under a Gaussian (ADM's decoder term)."""
    centered, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
