"""Stage 5: the runtime that runs each step's engine (full or a reuse graph) on the cache schedule and applies VC, and
`generate`, which samples through it (or a PyTorch model) into samples.npz, grid.png and config.json."""

from .generate import GRID_LIMIT, Provenance, SamplingOptions, generate
from .pipeline import EngineDenoiser, Pipeline

__all__ = ["GRID_LIMIT", "EngineDenoiser", "Pipeline", "Provenance", "SamplingOptions", "generate"]
