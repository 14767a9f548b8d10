"""Independent references written from the DiT equations, in float64, over raw state dicts.

Nothing here imports qandc: these functions restate the original DiT model (Peebles & Xie, 2023), its
`forward_with_cfg`, and the original diffusion (`space_timesteps`, respacing, learned-range variance, p_sample and
ddim_sample loops) so the tests compare qandc against the equations, not against itself.
"""

import math

import numpy as np
import torch


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].double().T + sd[f"{name}.bias"].double()


def _layer_norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _freq_embedding(t, dim=256, shift=0, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift))
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _pos_embed(dim, grid):
    def axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return torch.from_numpy(np.concatenate([axis(w), axis(h)], 1))


def dit_forward(sd, x, t, y, *, heads, depth, patch, learn_sigma=True, freq_shift=0, mlp_eps=1e-6):
    """The original DiT.forward from its equations; returns float64."""
    x = x.double()
    n, c, hgt, wid = x.shape
    hidden = sd["x_embedder.proj.weight"].shape[0]
    gh, gw = hgt // patch, wid // patch
    # patchify: a patch-sized linear map == the stride-patch convolution
    patches = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)
    w = sd["x_embedder.proj.weight"].double().reshape(hidden, -1)
    h = patches @ w.T + sd["x_embedder.proj.bias"].double() + _pos_embed(hidden, gh)[None]
    temb = _linear(_silu(_linear(_freq_embedding(t, shift=freq_shift), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    cond = temb + sd["y_embedder.embedding_table.weight"].double()[y]
    hd = hidden // heads
    for i in range(depth):
        b = f"blocks.{i}"
        mod = _linear(_silu(cond), sd, f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod)
        a = _layer_norm(h, 1e-6) * (1 + scale1) + shift1
        q, k, v = _linear(a, sd, f"{b}.attn.qkv").chunk(3, dim=-1)
        q, k, v = (z.reshape(n, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + gate1 * _linear(att.transpose(1, 2).reshape(n, -1, hidden), sd, f"{b}.attn.proj")
        m = _layer_norm(h, mlp_eps) * (1 + scale2) + shift2
        h = h + gate2 * _linear(_gelu_tanh(_linear(m, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    shift, scale = _linear(_silu(cond), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = _linear(_layer_norm(h, 1e-6) * (1 + scale[:, None]) + shift[:, None], sd, "final_layer.linear")
    out_c = c * 2 if learn_sigma else c
    h = h.reshape(n, gh, gw, patch, patch, out_c).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(n, out_c, hgt, wid)


def guided(model_out, cfg_scale, guided_channels):
    """Guidance on [cond; uncond] rows of the first `guided_channels` channels, the rest passed through."""
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond, uncond = eps.chunk(2)
    half = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)


def space_timesteps(num_timesteps, section_counts):
    """The original space_timesteps for a list of section counts."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


class Schedule:
    """The respaced original diffusion, all coefficients in float64."""

    def __init__(self, steps):
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        ac = np.cumprod(1 - betas)
        self.map = sorted(space_timesteps(1000, [steps]))
        new, last = [], 1.0
        for i, a in enumerate(ac):
            if i in self.map:
                new.append(1 - a / last)
                last = a
        self.betas = b = np.array(new)
        self.ac = np.cumprod(1 - b)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        self.post_var = b * (1 - self.ac_prev) / (1 - self.ac)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:])) if steps > 1 else None

    def mean_logvar_x0(self, out, x, i):
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        x0 = x / np.sqrt(self.ac[i]) - np.sqrt(1 / self.ac[i] - 1) * eps
        frac = (v + 1) / 2
        logvar = frac * np.log(self.betas[i]) + (1 - frac) * self.post_logvar[i]
        mean = (self.betas[i] * np.sqrt(self.ac_prev[i]) / (1 - self.ac[i])) * x0 + \
            ((1 - self.ac_prev[i]) * np.sqrt(1 - self.betas[i]) / (1 - self.ac[i])) * x
        return mean, logvar, x0


def ddim_loop(model_fn, schedule, x):
    """The original ddim_sample_loop with eta 0; model_fn(x, original_t) -> model output."""
    for i in reversed(range(len(schedule.betas))):
        out = model_fn(x, schedule.map[i])
        _, _, x0 = schedule.mean_logvar_x0(out, x, i)
        eps = (x / np.sqrt(schedule.ac[i]) - x0) / np.sqrt(1 / schedule.ac[i] - 1)
        x = x0 * np.sqrt(schedule.ac_prev[i]) + np.sqrt(1 - schedule.ac_prev[i]) * eps
    return x


def ddpm_loop(model_fn, schedule, x, noises):
    """The original p_sample_loop (learned range); noises[k] is the noise of the k-th step taken."""
    for k, i in enumerate(reversed(range(len(schedule.betas)))):
        mean, logvar, _ = schedule.mean_logvar_x0(model_fn(x, schedule.map[i]), x, i)
        x = mean + (torch.exp(0.5 * logvar) * noises[k] if i > 0 else 0)
    return x
