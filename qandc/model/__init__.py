"""Stage 1a: the DiT, its named configs, and checkpoint loading (original DiT and diffusers formats)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .dit import DIT_CONFIGS, DiT, DiTConfig, guide, initialize_weights, named_config

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "guide", "initialize_weights", "load_checkpoint", "named_config",
           "save_checkpoint"]
