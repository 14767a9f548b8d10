"""Stage 5: the runtime that runs each step's engine (full or a reuse graph) on the cache schedule and applies VC, and
`generate`, which samples through it (or a PyTorch model) into samples.npz, grid.png and config.json;
`QandcDiTPipeline` calls it as diffusers calls a DiTPipeline."""

from .dit_pipeline import DiTPipelineOutput, QandcDiTPipeline
from .generate import GRID_LIMIT, Provenance, SamplingOptions, generate
from .pipeline import EngineDenoiser, Pipeline

__all__ = ["GRID_LIMIT", "DiTPipelineOutput", "EngineDenoiser", "Pipeline", "Provenance", "QandcDiTPipeline",
           "SamplingOptions", "generate"]
