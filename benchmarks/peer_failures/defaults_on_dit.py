"""What diffusers' cache hooks do on a DiT with their defaults, as a user would apply them, and so why
qandc.peers adapts each (benchmarks/front_peers.py measures the adapted ones). The shipped reference DiT, converted,
sampled for 6 DDIM steps with CFG (CPU, about a minute):

- FirstBlockCache: a DiT is no CacheMixin, so no pipeline sets the cache context its state needs: it raises.
- TaylorSeerCache: its default patterns ('^transformer_blocks.*attn', fullmatch) match no module of a DiT
  (`attn1`): nothing is cached, the compute fraction stays 1.
- FasterCache: it splits only the kwargs it names into [uncond; cond] halves; `class_labels` is not one of them,
  so a call that skips the unconditional rows fails on mismatched batch sizes. (Given `class_labels`, qandc's
  [cond; uncond] order would still need swapping: else it approximates the conditional rows.)
- SeaCache: no built-in adapter gives a DiT's latents to its indicator: it fails open and computes everything.
- PyramidAttentionBroadcast: it caches attention only, 43% of a block's FLOPs on this model: reusing it at every
  step but the first still leaves a compute fraction far above 0.5.

Run: PYTHONPATH=. python benchmarks/peer_failures/defaults_on_dit.py
"""

import logging

import torch
from diffusers import hooks
from diffusers.hooks import HookRegistry

from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT, to_diffusers
from qandc.peers import BranchCounter, DiffusersDenoiser
from qandc.sampling import sample

STEPS = 6


class PlainDenoiser(DiffusersDenoiser):
    """The converted DiT behind qandc's denoiser face, called as a pipeline would call it: no cache context, the
    batch in qandc's order."""

    def forward_graph(self, spec, feeds):
        self.timestep = int(feeds["t"][0])
        return {"out": self.transformer(hidden_states=feeds["x"], timestep=feeds["t"], class_labels=feeds["y"]).sample}


def run(model, apply) -> str:
    denoiser = PlainDenoiser(to_diffusers(model), model.config, STEPS)
    apply(denoiser.transformer, lambda: denoiser.timestep)
    HookRegistry.check_if_exists_or_initialize(denoiser.transformer).invalidate_child_registries_cache()
    counter = BranchCounter(denoiser.transformer, model.config)
    try:
        sample(denoiser, [1, 2, 3], STEPS, "ddim", cfg_scale=1.5, seed=0)
    except Exception as e:  # the failure is what this script shows
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return f"runs, compute fraction {counter.fraction:.3f}"


CASES = {
    "FirstBlockCache": lambda m, t: hooks.apply_first_block_cache(m, hooks.FirstBlockCacheConfig(threshold=1e9)),
    "TaylorSeerCache": lambda m, t: hooks.apply_taylorseer_cache(m, hooks.TaylorSeerCacheConfig(cache_interval=2)),
    "FasterCache": lambda m, t: hooks.apply_faster_cache(m, hooks.FasterCacheConfig(
        current_timestep_callback=t, tensor_format="BCHW", unconditional_batch_timestep_skip_range=(-1, 1000))),
    "SeaCache": lambda m, t: hooks.apply_sea_cache(m, hooks.SeaCacheConfig(threshold=1e9)),
    "PyramidAttentionBroadcast": lambda m, t: hooks.apply_pyramid_attention_broadcast(
        m, hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=1000,
                                                 spatial_attention_timestep_skip_range=(-1, 1000),
                                                 current_timestep_callback=t)),
}


def main():
    logging.disable(logging.WARNING)  # diffusers' warnings (FasterCache is experimental, SeaCache fails open)
    model = load_checkpoint(REFERENCE_CHECKPOINT)
    with torch.no_grad():
        for name, apply in CASES.items():
            print(f"{name}: {run(model, apply)}")


if __name__ == "__main__":
    main()
