"""diffusers' cache hooks as peers of qandc's cache plans: the same model, driven by qandc's sampler on the same noise.

`DiffusersDenoiser` puts a diffusers DiT (`qandc.model.checkpoint.to_diffusers`) behind the denoiser face that
`qandc.sampling.sample` drives (with plan=None: the full graph, no cache tensors), so sample i's noise is keyed by
(seed, i) as for qandc's model. A diffusers DiT is no `CacheMixin`, so nothing sets the cache context its stateful
hooks read: the denoiser sets it on every call (step index, step count, timestep, and the noise level as a
flow-matching sigma, which SeaCache reads), and resets the hooks' state at a run's first step. The hooks decide per
call, that is per batch (with CFG, the conditional and unconditional rows together), not per sample.

`apply_peer` applies one of `PEERS` with its knobs (JSON-able settings), adapted to a DiT where diffusers' defaults
do not fit: TaylorSeer's default patterns match no DiT module (it is given every block's `attn1` and `ff`);
FasterCache wants its [uncond; cond] batch order (the denoiser swaps qandc's [cond; uncond] halves around the call)
and splits only the kwargs it names (`class_labels` is added); SeaCache needs the latents its indicator filters
(`sea_indicator_latents`). `BranchCounter` counts the attention and MLP computations that actually run, so a run's
compute fraction is measured, not assumed.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
from functools import partial

import torch

from .errors import QandcError
from .model.dit import DiTConfig, branch_flops, branch_names
from .sampling import sample
from .sampling.diffusion import Diffusion

PEERS = ("TaylorSeerCache", "FirstBlockCache", "MagCache", "SeaCache", "FasterCache", "PyramidAttentionBroadcast")
CONTEXT = "batch"  # the one cache context: every call holds the whole batch (CFG rows included)
TAYLORSEER_MODULES = r"transformer_blocks\.\d+\.(attn1|ff)"


class DiffusersDenoiser:
    """A diffusers `DiTTransformer2DModel` with qandc's denoiser face (`config`, `device`, `branch_names`,
    `forward_graph`) for `steps`-step runs; `config` is the qandc config of the model it was converted from (its
    guidance mode, classes and learned sigma are what the sampler reads)."""

    def __init__(self, transformer, config: DiTConfig, steps: int):
        self.transformer, self.config, self.steps = transformer, config, steps
        self.diffusion = Diffusion(steps, learn_sigma=config.learn_sigma)
        self.uncond_first = False  # FasterCache's batch order: [uncond; cond]
        self.timestep = None       # the current call's timestep, for the hooks' timestep callbacks

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def branch_names(self) -> list[str]:
        return branch_names(self.config.depth)

    def forward_graph(self, spec, feeds: dict) -> dict:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        if spec.reuse or spec.emit:
            raise QandcError("a diffusers denoiser runs the full graph only (its hooks do the caching): sample "
                             "with plan=None")
        x, t, y = feeds["x"], feeds["t"], feeds["y"]
        step, sigma = self._position(int(t[0]))
        if step == 0:
            HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()
        self.timestep = int(t[0])
        swap = self.uncond_first and len(y) % 2 == 0 and bool((y[len(y) // 2:] == self.config.num_classes).all())
        if swap:
            x, t, y = (torch.cat(v.chunk(2)[::-1]) for v in (x, t, y))
        _set_cache_context(self.transformer, CacheContext(CONTEXT, step_index=step, num_inference_steps=self.steps,
                                                          timestep=self.timestep, sigma=sigma))
        try:
            out = self.transformer(hidden_states=x, timestep=t, class_labels=y).sample
        finally:
            _set_cache_context(self.transformer, None)
        return {"out": torch.cat(out.chunk(2)[::-1]) if swap else out}

    def _position(self, timestep: int) -> tuple[int, float]:
        """(step index, sigma) of a timestep of a `steps`-step run; sigma is the noise level of the equivalent
        flow-matching latent x / (sqrt(ᾱ) + sqrt(1 − ᾱ)) = (1 − σ) x₀ + σ ε."""
        if timestep not in self.diffusion.timestep_map:
            raise QandcError(f"timestep {timestep} is not one of a {self.steps}-step run's")
        index = self.diffusion.timestep_map.index(timestep)
        alpha_bar = float(self.diffusion.alphas_cumprod[index])
        noise = math.sqrt(1 - alpha_bar)
        return self.steps - 1 - index, noise / (math.sqrt(alpha_bar) + noise)


class BranchCounter:
    """Counts the branch computations a diffusers DiT runs, in FLOPs (`branch_flops`) times rows: a forward hook on
    each block's attention output projection and MLP output layer, which run only when that branch is computed (a
    cache hook that reuses a branch, or skips its block, never calls them); a pre-hook on the model counts the rows
    an uncached call would compute."""

    def __init__(self, transformer, config: DiTConfig):
        self.flops = branch_flops(config)
        self.done = self.possible = 0.0
        self.handles = [transformer.register_forward_pre_hook(self._call, with_kwargs=True)]
        for i, block in enumerate(transformer.transformer_blocks):
            for name, module in ((f"blocks.{i}.attn", block.attn1.to_out[0]), (f"blocks.{i}.mlp", block.ff.net[2])):
                self.handles.append(module.register_forward_hook(partial(self._branch, self.flops[name])))

    def _call(self, module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.possible += sum(self.flops.values()) * len(hidden_states)

    def _branch(self, flops, module, inputs, output):
        self.done += flops * len(inputs[0])

    @property
    def fraction(self) -> float:
        """The branch FLOPs run over those of the same calls uncached (as `CachePlan.compute_fraction`)."""
        return self.done / self.possible if self.possible else float("nan")

    def reset(self) -> None:
        self.done = self.possible = 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def sea_indicator_latents(module, args, kwargs) -> list[torch.Tensor]:
    """SeaCache's raw vision for an image DiT: the batch's latents as one (B, 1, H, W, C) tensor, which its filter
    (FFT over the leading three axes after moving the first to the end) transforms per sample and channel over H and
    W, as it would a list of (C, 1, H, W) latents; the change between steps is then measured over the whole batch
    at once (as FirstBlockCache does) rather than averaged over per-sample ratios (thousands of tiny FFTs a step)."""
    latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return [latents.permute(0, 2, 3, 1).unsqueeze(1)]


def apply_peer(denoiser: DiffusersDenoiser, method: str, settings: dict) -> None:
    """Apply diffusers' hook `method` (one of `PEERS`) with `settings` (the knobs of its config that the benchmark
    tunes; the rest keep diffusers' defaults) to the denoiser's transformer."""
    from diffusers import hooks
    from diffusers.hooks import HookRegistry

    transformer, s = denoiser.transformer, dict(settings)
    timestep = lambda: denoiser.timestep  # noqa: E731
    if method == "TaylorSeerCache":
        hooks.apply_taylorseer_cache(transformer, hooks.TaylorSeerCacheConfig(
            **s, taylor_factors_dtype=torch.float32, cache_identifiers=[TAYLORSEER_MODULES]))
    elif method == "FirstBlockCache":
        hooks.apply_first_block_cache(transformer, hooks.FirstBlockCacheConfig(**s))
    elif method == "MagCache":
        hooks.apply_mag_cache(transformer, hooks.MagCacheConfig(**s, num_inference_steps=denoiser.steps))
    elif method == "SeaCache":
        hooks.apply_sea_cache(transformer, hooks.SeaCacheConfig(**s, raw_vision_callback=sea_indicator_latents))
    elif method == "FasterCache":
        weight = s.pop("attention_weight")
        identifiers = [*hooks.faster_cache._UNCOND_COND_INPUT_KWARGS_IDENTIFIERS, "class_labels"]
        hooks.apply_faster_cache(transformer, hooks.FasterCacheConfig(
            **s, attention_weight_callback=lambda _: weight, current_timestep_callback=timestep,
            tensor_format="BCHW", _unconditional_conditional_input_kwargs_identifiers=identifiers))
        denoiser.uncond_first = True
    elif method == "PyramidAttentionBroadcast":
        hooks.apply_pyramid_attention_broadcast(transformer, hooks.PyramidAttentionBroadcastConfig(
            **s, current_timestep_callback=timestep))
    else:
        raise QandcError(f"unknown peer {method!r}; known: {', '.join(PEERS)}")
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def peer_denoiser(model, steps: int, method: str | None = None, settings: dict | None = None) -> DiffusersDenoiser:
    """A fresh diffusers copy of the qandc DiT `model` behind the denoiser face, with the hook `method` applied
    (None: none)."""
    from .model.checkpoint import to_diffusers

    denoiser = DiffusersDenoiser(to_diffusers(model), model.config, steps)
    if method is not None:
        apply_peer(denoiser, method, settings or {})
    return denoiser


def calibrate_magcache(model, labels, steps: int, sampler: str, cfg_scale: float, seed: int) -> list[float]:
    """MagCache's magnitude ratios of `model` for these runs, as its calibration mode measures them on one uncached
    run of `labels` (a batch) and prints them for the user to copy (read here from what it prints)."""
    denoiser = peer_denoiser(model, steps, "MagCache", {"calibrate": True})
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        sample(denoiser, labels, steps, sampler, cfg_scale, seed=seed)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    ratios = ast.literal_eval(lists[-1]) if lists else []
    if len(ratios) != steps:
        raise QandcError(f"MagCache calibration printed {len(ratios)} ratios for {steps} steps")
    return [float(r) for r in ratios]
