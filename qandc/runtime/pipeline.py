"""The runtime: loads an engine directory and samples with the one DDPM / DDIM implementation of
`qandc.sampling`, through an adapter that gives the engines the denoiser face. Full steps run the full engine
(which also returns the cache tensors), reuse steps the reuse engine fed the kept cache; VC is applied after every
step; the run reports how many steps took each path (a cache that never fires is visible)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..calibration.vc import vc_correction
from ..engines import load_engines
from ..errors import QandcError
from ..model.dit import DiTConfig
from ..sampling import CachePlan, sample


class EngineDenoiser:
    """The engines behind the denoiser face the sampler drives (inputs and outputs cross as CPU numpy arrays)."""

    def __init__(self, manifest: dict, engines: dict):
        self.config = DiTConfig.from_dict(manifest["model"])
        self.branch_names = [f"blocks.{i}.{k}" for i in range(self.config.depth) for k in ("attn", "mlp")]
        self.cache_inputs = manifest["cache_inputs"]
        self.engines = engines
        self.device = torch.device("cpu")
        self.calls = {"full": 0, "reuse": 0}
        self.max_batch = manifest["max_batch"] if manifest["backend"] == "tensorrt" else None  # its plan's profile

    def _feeds(self, x, t, y):
        if self.max_batch is not None and len(x) > self.max_batch:
            raise QandcError(f"a batch of {len(x)} rows (guidance doubles the labels) exceeds the engines' "
                             f"profile of {self.max_batch}; lower --batch-size or rebuild with a larger --max-batch")
        return {"x": x.cpu().numpy().astype(np.float32), "t": t.cpu().numpy().astype(np.int64),
                "y": y.cpu().numpy().astype(np.int64)}

    def forward_full(self, x, t, y, branches=None, regate=False):
        if branches is not None and list(branches) != self.cache_inputs:
            raise QandcError("the plan's reuse set differs from the one the engines were built with")
        self.calls["full"] += 1
        out = self.engines["full"].infer(self._feeds(x, t, y))
        return torch.from_numpy(out["out"]), {b: out[b] for b in self.cache_inputs}

    def forward_reuse(self, x, t, y, cache, regate=False):
        self.calls["reuse"] += 1
        return torch.from_numpy(self.engines["reuse"].infer({**self._feeds(x, t, y), **cache})["out"])


class Pipeline:
    """`Pipeline.load(engine_dir).generate(labels, seed)`: images in the model's output space."""

    def __init__(self, manifest: dict, engines: dict):
        self.manifest = manifest
        self.denoiser = EngineDenoiser(manifest, engines)
        self.plan = CachePlan.from_dict(manifest["plan"])
        self.vc = None if manifest.get("vc") is None else torch.tensor(manifest["vc"], dtype=torch.float32)

    @classmethod
    def load(cls, folder: str | Path) -> "Pipeline":
        return cls(*load_engines(folder))

    @property
    def config(self) -> DiTConfig:
        return self.denoiser.config

    def generate(self, labels, seed: int, steps: int | None = None, sampler: str | None = None,
                 cfg_scale: float | None = None, sample_ids=None, use_vc: bool = True,
                 progress: bool = False) -> torch.Tensor:
        defaults = self.manifest["sampler"]
        steps = steps or defaults["steps"]
        correction = vc_correction(self.vc, steps, "the engines") if use_vc else None
        return sample(self.denoiser, labels, steps, sampler or defaults["sampler"],
                      defaults["cfg_scale"] if cfg_scale is None else cfg_scale, seed=seed, plan=self.plan,
                      correction=correction, sample_ids=sample_ids, progress=progress)
