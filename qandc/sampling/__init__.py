"""Stage 1b: the original DiT diffusion (respacing, DDPM / DDIM, classifier-free guidance) under cache plans."""

from .diffusion import Diffusion, space_timesteps
from .plan import CachePlan
from .sampler import SAMPLERS, SamplerDefaults, SamplingRun, check_labels, draw_noise, sample, sample_generator

__all__ = ["SAMPLERS", "CachePlan", "Diffusion", "SamplerDefaults", "SamplingRun", "check_labels", "draw_noise",
           "sample", "sample_generator", "space_timesteps"]
