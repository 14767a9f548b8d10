"""`QandcDiTPipeline`: qandc's `Pipeline` (its engines, or a model with a recipe or cache plan) called like diffusers'
`DiTPipeline`, returning PIL images.

Where results differ from `DiTPipeline`'s on the same weights:
- noise: qandc keys sample i's noise by (seed, i) and takes the seed from the generator (`initial_seed()`), so a
  sample does not depend on batch size or position, and one generator gives the same images call after call; diffusers
  draws every sample's noise from the generator's running state;
- schedule: qandc's own DDPM / DDIM respacing of the 1000-step linear schedule (the original DiT's), never the
  folder's scheduler, which is only checked to be trained on that schedule; DDPM steps use a learned-sigma model's
  variance, which DiTPipeline discards;
- guidance: the model's guidance mode (diffusers-loaded DiTs guide every predicted-noise channel, as DiTPipeline does;
  original checkpoints the first three), the default scale the artifact's (1.5 for a plain model, not 4.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import QandcError
from ..images import decode_latents, has_image_space, load_vae, model_to_images, to_pil, to_uint8
from ..sampling import CachePlan
from .pipeline import Pipeline


@dataclass
class DiTPipelineOutput:
    """As diffusers' ImagePipelineOutput: `images`, a list of PIL images or an (N, H, W, C) array in [0, 1]."""

    images: list | np.ndarray


class QandcDiTPipeline:
    """A qandc `Pipeline` behind diffusers' `DiTPipeline.__call__`. `vae`: a diffusers AutoencoderKL (or its folder)
    decoding a latent model's samples, scaled by its config's `scaling_factor`; pixel-space models need none."""

    def __init__(self, pipeline: Pipeline, vae=None):
        self.pipeline = pipeline
        self.vae = load_vae(vae, pipeline.device) if isinstance(vae, (str, Path)) else vae

    @classmethod
    def from_pretrained(cls, path: str | Path, cache: str = "none", device: str | torch.device = "cpu",
                        vae=None, recipe: str | Path | None = None) -> "QandcDiTPipeline":
        """A checkpoint qandc loads (a diffusers DiT pipeline folder included: its transformer, and its vae/ unless
        `vae` is given) as a float model with the cache plan `cache` (qandc's --cache syntax), or with `recipe` (a
        `qandc calibrate` folder: its fake quant, cache plan, VC table and sampler defaults)."""
        from ..formats.recipe import load_recipe_checkpoint
        from ..model.checkpoint import load_checkpoint, pipeline_vae

        if recipe is None:
            pipeline = Pipeline.from_model(load_checkpoint(path).to(device), CachePlan.parse(cache))
        elif cache != "none":
            raise QandcError("a recipe carries its own cache plan: leave cache out")
        else:
            pipeline = Pipeline.from_recipe(load_recipe_checkpoint(recipe, path), recipe, device=device)
        return cls(pipeline, vae or pipeline_vae(path))

    def __call__(self, class_labels, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 sampler: str | None = None):
        """Images of `class_labels` (an int or a list of ints). `num_inference_steps`, `guidance_scale` and
        `sampler` ("ddpm" / "ddim") default to the pipeline's sampler defaults (the recipe's or the engines'; 50,
        1.5, ddpm for a plain model). `generator`: its `initial_seed()` is qandc's seed; None draws a seed from
        torch's global generator (as diffusers draws its noise). `output_type`: "pil" or "np"."""
        if isinstance(generator, (list, tuple)):
            raise QandcError("a list of generators is not supported: qandc keys each sample's noise by (seed, "
                             "index), so one generator seeds them all")
        if output_type not in ("pil", "np"):
            raise QandcError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        seed = generator.initial_seed() if generator is not None else int(torch.randint(2 ** 62, ()).item())
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        samples = self.pipeline.generate(torch.tensor(labels), seed, num_inference_steps, sampler, guidance_scale)
        images = self._to_images(samples)
        if output_type == "pil":
            images = [to_pil(image) for image in to_uint8(images)]
        else:  # as diffusers: (N, H, W, C) float32 in [0, 1]
            images = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return DiTPipelineOutput(images) if return_dict else (images,)

    def _to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples in model space -> images in [-1, 1]."""
        config = self.pipeline.config
        if has_image_space(config):
            return model_to_images(samples, config)
        if self.vae is None:
            raise QandcError(f"a {config.in_channels}-channel latent model needs a VAE to make images: give vae= "
                             "(a diffusers AutoencoderKL or its folder)")
        return decode_latents(samples.to(self.vae.device), self.vae)
