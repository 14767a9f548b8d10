"""The calibration pool: full-precision trajectories run under the cache plan, one entry per (sample, step).

The pool keeps only what identifies an entry — (seed, sample index, label, step) — and its x_t. What each graph call
sees (CFG-doubled batch, cache factors and Taylor weights) is recovered by replaying the trajectories of the selected
samples: noise is keyed per sample, so a replay in another batch reproduces them.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ..progress import progress

from ..artifacts import atomic_path, read_json, write_json
from ..distributed import World, merge_shards, run_shards
from ..errors import QandcError
from ..model.graphs import GraphSpec
from ..readers import read_npz
from ..sampling import CachePlan, Diffusion, draw_noise, sample, sample_generator

POOL_ARRAYS = ("x", "t", "step", "sample", "label", "full")  # the arrays of pool.npz


@dataclass
class Pool:
    """Entries in (sample, step) order. meta: how the trajectories were made (seed, steps, sampler, plan, ...)."""

    x: np.ndarray          # (N, C, H, W) float16: the model input x_t of the entry
    t: np.ndarray          # (N,) original diffusion timestep
    step: np.ndarray       # (N,) sampling-step index, 0 = first (noisiest)
    sample: np.ndarray     # (N,) sample index (noise key together with the seed)
    label: np.ndarray      # (N,)
    full: np.ndarray       # (N,) whether the plan runs the full graph at that step
    meta: dict = field(default_factory=dict)

    @property
    def pool_id(self) -> str:
        return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, folder: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, x=self.x, t=self.t, step=self.step, sample=self.sample, label=self.label, full=self.full)
        with atomic_path(folder / "pool.npz") as tmp:
            tmp.write_bytes(buffer.getvalue())
        write_json(folder / "pool.json", {**self.meta, "pool_id": self.pool_id, "entries": len(self.t)})

    @classmethod
    def load(cls, folder: Path) -> "Pool":
        meta = read_json(folder / "pool.json")
        path = folder / "pool.npz"
        data = read_npz(path, "calibration pool")
        missing = [k for k in POOL_ARRAYS if k not in data]
        if missing:
            raise QandcError(f"{path}: not a readable calibration pool (no {', '.join(missing)})")
        arrays = {k: data[k] for k in POOL_ARRAYS}
        if any(a.ndim == 0 for a in arrays.values()) or len({len(a) for a in arrays.values()}) != 1:
            raise QandcError(f"{path}: not a readable calibration pool (arrays of different lengths)")
        meta.pop("pool_id", None)
        meta.pop("entries", None)
        return cls(**arrays, meta=meta)


def collect_pool(model, num_samples: int, steps: int, sampler: str, cfg_scale: float, plan: CachePlan, seed: int,
                 batch_size: int, shards: str | Path, world: World = World()) -> Pool | None:
    """Run `num_samples` trajectories (labels i % classes) under the plan and keep every step's x_t. The
    trajectories are split into units of `batch_size`, shared among the ranks of `world` and kept as files in
    `shards` (a rerun skips finished ones); rank 0 returns the pool, the other ranks None."""
    c = model.config
    shape = (c.in_channels, c.input_size, c.input_size)

    def trajectories(unit: dict) -> dict[str, np.ndarray]:
        index = np.arange(*unit["samples"])
        labels = torch.from_numpy(index % c.num_classes)
        inputs = [draw_noise([sample_generator(seed, int(i)) for i in index], shape)]
        record = lambda step, x: inputs.append(x.detach().cpu()) or x  # noqa: E731 - x after step = next input
        sample(model, labels, steps, sampler, cfg_scale, seed=seed, plan=plan, sample_ids=index, correction=record)
        return {"x": torch.stack(inputs[:steps], dim=1).half().numpy(), "sample": index}  # x: (B, steps, C, H, W)

    meta = {"seed": seed, "num_samples": num_samples, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale,
            "plan": plan.to_dict(), "labels": "i % num_classes", "model": c.to_dict()}
    units = [{"samples": [start, min(start + batch_size, num_samples)]} for start in range(0, num_samples, batch_size)]
    files = run_shards(shards, units, trajectories, world, meta, desc="pool")
    if not world.main:
        return None
    data = merge_shards(files, ("x", "sample"))
    index, x = data["sample"], data["x"].reshape(-1, *shape)
    step = np.tile(np.arange(steps), len(index))
    full = plan.full_steps(steps)
    return Pool(x=x, t=np.array(Diffusion(steps).timestep_map)[::-1][step], step=step, sample=np.repeat(index, steps),
                label=np.repeat(index % c.num_classes, steps), full=np.array(full)[step], meta=meta)


@dataclass
class CalibrationEntry:
    """What one graph call sees at one selected (sample, step): the graph's name and its feeds (x, t, y, and the
    cache factors and Taylor weights it takes), each with the entry's rows on axis 0 (both CFG rows when guided)."""

    graph: str
    feeds: dict[str, torch.Tensor]

    @property
    def rows(self) -> int:
        return len(self.feeds["x"])


def run_entries(model, entries: list[CalibrationEntry], graphs: dict[str, GraphSpec], batch_size: int):
    """Yield (entry positions, each entry's outputs by name) running the entries, grouped by graph and concatenated
    up to `batch_size` entries a call, through `model.forward_graph` with the graph (`graphs`, by name) each was
    recorded on."""
    for name in dict.fromkeys(e.graph for e in entries):
        group = [i for i, e in enumerate(entries) if e.graph == name]
        for start in range(0, len(group), batch_size):
            index = group[start:start + batch_size]
            batch = [entries[i] for i in index]
            feeds = {k: torch.cat([e.feeds[k] for e in batch]) for k in batch[0].feeds}
            outputs = model.forward_graph(graphs[name], feeds)
            parts = {k: v.split([e.rows for e in batch]) for k, v in outputs.items()}
            yield index, [{k: parts[k][j] for k in parts} for j in range(len(batch))]


class _Recorder:
    """A denoiser wrapper that records the graph feeds of the selected (sample, step) rows as the sampler calls it."""

    def __init__(self, model, wanted: dict[int, set[int]], index: np.ndarray):
        self.model, self.config, self.branch_names = model, model.config, model.branch_names
        self.wanted, self.index, self.step, self.entries = wanted, index, 0, {}

    @property
    def device(self):
        return self.model.device

    def forward_graph(self, spec, feeds: dict) -> dict:
        n = len(self.index)
        for row, i in enumerate(self.index):
            if self.step in self.wanted.get(int(i), ()):
                rows = [row, row + n] if len(feeds["x"]) == 2 * n else [row]
                self.entries[(int(i), self.step)] = CalibrationEntry(
                    spec.name, {k: v[rows].clone() for k, v in feeds.items()})
        self.step += 1
        return self.model.forward_graph(spec, feeds)


def replay(model, pool: Pool, selected: np.ndarray, batch_size: int = 256) -> list[CalibrationEntry]:
    """Re-run the trajectories of the selected entries' samples and return each selected entry's inputs."""
    meta = pool.meta
    plan = CachePlan.from_dict(meta["plan"])
    wanted: dict[int, set[int]] = {}
    for k in selected:
        wanted.setdefault(int(pool.sample[k]), set()).add(int(pool.step[k]))
    samples = np.array(sorted(wanted))
    entries = {}
    for start in progress(range(0, len(samples), batch_size), "replay"):
        index = samples[start:start + batch_size]
        recorder = _Recorder(model, wanted, index)
        labels = torch.from_numpy(index % model.config.num_classes)
        sample(recorder, labels, meta["steps"], meta["sampler"], meta["cfg_scale"], seed=meta["seed"], plan=plan,
               sample_ids=index)
        entries.update(recorder.entries)
    return [entries[(int(pool.sample[k]), int(pool.step[k]))] for k in selected]
