"""Stage 1b: the original DiT diffusion (respacing, DDPM / DDIM, classifier-free guidance) under cache plans."""

from .diffusion import Diffusion, space_timesteps
from .plan import CachePlan
from .sampler import (SAMPLERS, SamplerDefaults, SamplingRun, check_labels, draw_noise, draws_step_noise, model_labels,
                      sample, sample_generator, sample_generators)

__all__ = ["SAMPLERS", "CachePlan", "Diffusion", "SamplerDefaults", "SamplingRun", "check_labels", "draw_noise",
           "draws_step_noise", "model_labels", "sample", "sample_generator", "sample_generators", "space_timesteps"]
