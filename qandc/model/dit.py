"""DiT with adaLN-Zero blocks (Peebles & Xie, 2023), with a full and a reuse path over the same blocks.

Module and parameter names follow facebookresearch/DiT `models.py`, so its state dicts load as they are.
Differences between checkpoint sources (diffusers' timestep-frequency shift, its MLP LayerNorm epsilon, the
guidance mode) are fields of `DiTConfig`, not a second model.

The cache: every block has two residual branches, named `blocks.<i>.attn` and `blocks.<i>.mlp`. `forward_full`
computes everything and also returns the outputs of the requested branches; `forward_reuse` takes those outputs
instead of computing the branches. With `regate=True` the cached tensor is the branch output *before* the adaLN
gate and is multiplied by the current step's gate; with `regate=False` it is the gated output, reused as it is.
`forward_graph` runs one engine graph of a cache plan (`qandc.model.graphs`), forecasting included: it is what the
sampler drives, and what the exporter and the engine backends trace. A graph may cache the trunk (`graphs.TRUNK`,
x_L - x_0 over all the blocks) instead of every branch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import mistyped
from .forecast import TAYLOR, TORCH_FACTOR_DTYPES, factor_names, forecast, refresh
from .graphs import TRUNK

GUIDANCE_MODES = ("first3", "all")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture and numerics of a DiT.

    guidance: "first3" guides the first 3 output channels, as the original `forward_with_cfg` does (kept for
    fidelity to released checkpoints); "all" guides every predicted-noise channel, as diffusers' DiTPipeline does.
    The learned-sigma channels are never guided in "all" mode.
    freq_shift: 0 for the original timestep embedding, 1 for diffusers' (`downscale_freq_shift=1`).
    pixel_shuffle, image_crop: how outputs become images: pixel-shuffled by this factor (1 = as they are), then
    centre-cropped to this size (0 = no crop). The Fashion-MNIST reference model uses 2 and 28.
    block_embedders: every block after the first has its own timestep/label embedder (`DiT.block_embedders`), as
    DiTs trained with diffusers do; block 0 and the final layer use the model's (as diffusers' forward does).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    guidance: str = "first3"
    pixel_shuffle: int = 1
    image_crop: int = 0
    block_embedders: bool = False

    def __post_init__(self):
        wrong = mistyped(DiTConfig, self.to_dict())
        if wrong:
            raise ValueError(f"wrong types: {', '.join(f'{name}={getattr(self, name)!r}' for name in wrong)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.input_size % self.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DiT config fields: {', '.join(sorted(unknown))}")
        return cls(**data)


# The DiT paper's configs: name -> (depth, hidden size, patch size, heads).
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in {
        "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)
    }.items()
    for patch in (2, 4, 8)
}


def named_config(name: str, **overrides) -> DiTConfig:
    """A `DiTConfig` for a DiT paper name such as "DiT-XL/2", with any field overridden."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name], **overrides})


def branch_names(depth: int) -> list[str]:
    """The cacheable branches of a DiT of `depth` blocks, in execution order."""
    return [f"blocks.{i}.{kind}" for i in range(depth) for kind in ("attn", "mlp")]


def branch_flops(config: DiTConfig) -> dict[str, float]:
    """Multiply-adds of each branch per image: attention (qkv, proj, scores, values) and MLP weigh differently."""
    tokens, d = (config.input_size // config.patch_size) ** 2, config.hidden_size
    attn = tokens * (4 * d * d + 2 * tokens * d)
    mlp = tokens * 2 * d * int(d * config.mlp_ratio)
    return {b: float(attn if b.endswith(".attn") else mlp) for b in branch_names(config.depth)}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] of (fractional) timesteps; `freq_shift=1` is diffusers' variant."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / (half - freq_shift))[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D sin-cos positional embedding of MAE / DiT: (grid_size², dim)."""

    def one_axis(positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        out = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_shift=0, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t):
        embedding = timestep_embedding(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; the extra last row is the null class of classifier-free guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class ConditionEmbedder(nn.Module):
    """A block's own timestep and label embedders: its conditioning is their sum."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.t_embedder = TimestepEmbedder(config.hidden_size, config.freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size)

    def forward(self, t, y):
        return self.t_embedder(t) + self.y_embedder(y)


def split_heads(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """q, k, v stacked [3, B, H, T, D] of a qkv projection's output [B, T, 3C] (q, k, v, each `heads` heads side by
    side)."""
    b, n, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.attend(self.qkv(x))

    def attend(self, qkv):
        """The attention and its output projection, from the qkv projection's output [B, T, 3C]."""
        b, n, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = split_heads(qkv, self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class _CacheIO:
    """What one pass reads from and writes to the cache."""

    reuse: dict          # branch name -> cached tensor, used instead of computing the branch
    emit: frozenset      # branch names whose outputs this pass returns
    regate: bool
    out: dict


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mlp_norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, name: str = "", io: _CacheIO | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + self._branch(f"{name}.attn", gate_msa, io,
                             lambda: self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self._branch(f"{name}.mlp", gate_mlp, io,
                             lambda: self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x

    @staticmethod
    def _branch(name, gate, io, compute):
        """The gated branch output: computed, or taken from the cache; emitted to the cache when asked."""
        out, gate = DiTBlock.branch_parts(name, gate, io, compute)
        return out if gate is None else gate.unsqueeze(1) * out

    @staticmethod
    def branch_parts(name, gate, io, compute):
        """(the branch output, the gate [B, C] it is still to be multiplied by, or None where it is gated already)
        as `_branch` takes them apart: computed, or taken from the cache; emitted to the cache when asked."""
        if io is not None and name in io.reuse:
            return io.reuse[name], gate if io.regate else None
        if io is None or name not in io.emit:
            return compute(), gate
        out = compute()
        if io.regate:
            io.out[name] = out
            return out, gate
        io.out[name] = gate.unsqueeze(1) * out
        return io.out[name], None


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer; `forward(x, t, y)` is the original DiT forward."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, config.freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden)
        num_patches = (config.input_size // config.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.num_heads, config.mlp_ratio, config.mlp_norm_eps) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, config.out_channels)
        # block index -> that block's own embedder (blocks 1.. with config.block_embedders; none otherwise)
        self.block_embedders = nn.ModuleDict(
            {str(i): ConditionEmbedder(config) for i in range(1, config.depth)} if config.block_embedders else {})
        grid = config.input_size // config.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(hidden, grid)).float().unsqueeze(0))

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def branch_names(self) -> list[str]:
        """Every cacheable branch, in execution order."""
        return branch_names(self.config.depth)

    def unpatchify(self, x):
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _run(self, x, t, y, io: _CacheIO | None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        if io is not None and TRUNK in io.reuse:  # every branch reused: their sum, no block runs
            return self.unpatchify(self.final_layer(x + io.reuse[TRUNK], c))
        embedded = x
        for i, block in enumerate(self.blocks):
            own = self.block_embedders[str(i)](t, y) if str(i) in self.block_embedders else c
            x = block(x, own, f"blocks.{i}", io)
        if io is not None and TRUNK in io.emit:
            io.out[TRUNK] = x.float() - embedded.float()
        return self.unpatchify(self.final_layer(x, c))

    def forward(self, x, t, y):
        return self._run(x, t, y, None)

    def forward_full(self, x, t, y, branches=None, regate: bool = False):
        """Compute everything; return (output, cache) with the outputs of `branches` (default: all)."""
        emit = frozenset(self.branch_names if branches is None else branches)
        io = _CacheIO(reuse={}, emit=emit, regate=regate, out={})
        return self._run(x, t, y, io), io.out

    def forward_reuse(self, x, t, y, cache: dict, regate: bool = False):
        """Compute every branch not in `cache`; take the cached outputs for those in it."""
        return self._run(x, t, y, _CacheIO(reuse=cache, emit=frozenset(), regate=regate, out={}))

    def forward_graph(self, spec, feeds: dict) -> dict:
        """Run the engine graph `spec` (a `GraphSpec`) on `feeds` (tensors by input name); return its outputs by
        name: the reused branches come from their factors (forecast when the plan forecasts), the emitted ones
        return refreshed factors."""
        dtype, order = self.pos_embed.dtype, spec.forecast
        weights = feeds.get(TAYLOR)
        reuse = {}
        for i, b in enumerate(spec.reuse):
            factors = [feeds[n] for n in factor_names(b, order + 1)]
            reuse[b] = forecast(factors, None if weights is None else weights[:, i]).to(dtype)
        io = _CacheIO(reuse=reuse, emit=frozenset(spec.emit), regate=spec.regate, out={})
        outputs = {"out": self._run(feeds["x"].to(dtype), feeds["t"], feeds["y"], io)}
        factor_dtype = TORCH_FACTOR_DTYPES[spec.factors] if order else dtype
        for i, b in enumerate(spec.emit, start=len(spec.reuse)):
            previous = [feeds[n] for n in factor_names(b, order)]
            new = refresh(io.out[b], previous, None if weights is None else weights[:, i], factor_dtype)
            # contiguous, like the zeros a run starts from: a branch can come out transposed (the residual stream
            # keeps the patch embedding's layout), and a compiled engine specialises on its inputs' strides (one
            # compilation a graph and shape, the one the build's compile cache holds)
            outputs.update(zip(factor_names(b, order + 1), (factor.to(factor_dtype).contiguous() for factor in new)))
        return outputs

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """The original `forward_with_cfg`: x holds the batch twice, y the labels then the null labels."""
        half = x[: len(x) // 2]
        return guide(self.forward(torch.cat([half, half]), t, y), cfg_scale, self.config)


def guide(model_out: torch.Tensor, cfg_scale: float, config: DiTConfig) -> torch.Tensor:
    """Classifier-free guidance on a [conditional; unconditional] output batch, in the config's guidance mode."""
    n = 3 if config.guidance == "first3" else config.in_channels
    eps, rest = model_out[:, :n], model_out[:, n:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def initialize_weights(model: DiT, seed: int = 0, zero_init: bool = True) -> DiT:
    """The original DiT initialisation, seeded. `zero_init=False` gives the adaLN and final layers random
    weights instead of zeros, so a random model computes non-trivial outputs (for benchmarks and smoke runs)."""
    generator = torch.Generator().manual_seed(seed)

    def xavier(weight):
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        with torch.no_grad():
            weight.copy_(torch.rand(weight.shape, generator=generator) * 2 * bound - bound)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            xavier(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for embedder in (model, *model.block_embedders.values()):
            for weight in (embedder.y_embedder.embedding_table.weight, embedder.t_embedder.mlp[0].weight,
                           embedder.t_embedder.mlp[2].weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        if zero_init:
            zeroed = [block.adaLN_modulation[-1] for block in model.blocks]
            zeroed += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
            for layer in zeroed:
                layer.weight.zero_()
                layer.bias.zero_()
    return model
