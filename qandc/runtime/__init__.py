"""Stage 5: the runtime that alternates the full and reuse engines on the cache schedule and applies VC."""

from .pipeline import EngineDenoiser, Pipeline

__all__ = ["EngineDenoiser", "Pipeline"]
