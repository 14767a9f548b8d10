"""`generate`: samples for a list of labels through a Pipeline, made in shards (kept in OUT/shards: a rerun keeps
the finished ones; under torchrun the ranks share them and rank 0 merges), saved as samples.npz, grid.png and
config.json."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import distributed
from ..artifacts import library_versions, relative_path, sha256_file, write_json
from ..distributed import World
from ..errors import QandcError
from ..formats.recipe import QuantRecipe
from ..images import (CAPTION_SEPARATOR, decode_latents, has_image_space, load_vae, model_to_images, save_grid,
                      to_uint8)
from ..locking import holds_output
from ..sampling import SAMPLERS, check_labels, space_timesteps
from ..sampling.diffusion import TRAIN_STEPS
from ..values import check, integer, real
from .pipeline import Pipeline

GRID_LIMIT = 256  # grid.png shows at most this many samples


@dataclass(frozen=True)
class SamplingOptions:
    """How `generate` samples: sampler settings, the noise seed, labels per shard, whether the VC table applies."""

    steps: int = 50
    sampler: str = "ddpm"
    eta: float = 0.0
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = 64
    use_vc: bool = True
    fixed_batch: bool | None = None  # None: when each new batch size compiles again (Pipeline.shape_specialised)

    def __post_init__(self):
        space_timesteps(TRAIN_STEPS, self.steps)
        if self.sampler not in SAMPLERS:
            raise QandcError(f"sampler must be {' or '.join(SAMPLERS)}, got {self.sampler!r}")
        check("eta", real, self.eta, low=0, high=1)
        check("cfg_scale", real, self.cfg_scale)
        check("seed", integer, self.seed, minimum=0)
        if self.batch_size < 1:
            raise QandcError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class Provenance:
    """What the samples come from, as config.json records it: the checkpoint, recipe or engine folder, and the
    sha256 of their files (which also stamp the shards, so other weights never reuse them)."""

    checkpoint: str | None = None
    recipe: str | None = None
    engines: str | None = None
    sha256: dict = field(default_factory=dict)

    @classmethod
    def of_engines(cls, folder: str | Path) -> "Provenance":
        return cls(engines=str(folder), sha256={"engines": sha256_file(Path(folder) / "manifest.json")})


@holds_output("generate")
def generate(pipeline: Pipeline, labels, out: str | Path, options: SamplingOptions = SamplingOptions(), *,
             provenance: Provenance = Provenance(), world: World = World(), vae: str | None = None,
             per_class: int | None = None, class_names: Sequence[str] = ()) -> dict | None:
    """Sample `labels` into `out` in shards of `options.batch_size`, then (rank 0) write samples.npz, grid.png and
    config.json and return its record (None on the other ranks). config.json times the engine load, the warm-up
    (fixed_batch), the sampling between two barriers (`sampled_images` of every rank) and rank 0's merge, which
    streams the shards into samples.npz one at a time. The grid shows the first GRID_LIMIT samples,
    latents decoded by the diffusers VAE folder `vae` (no grid for latents without one); with `per_class` > 1 it has
    one row per label, captioned from `class_names`. `world` (from distributed.init) is left once the shards are
    done."""
    labels = check_labels(labels, pipeline.config.num_classes)
    decoder = vae and load_vae(vae, pipeline.device)  # loaded before sampling: a bad folder fails at once
    out = Path(out)
    engine_steps = {"full": 0, "reuse": 0, "graphs": {}, "fallback_steps": 0}  # reuse: every reuse graph's steps

    fixed = pipeline.shape_specialised if options.fixed_batch is None else options.fixed_batch
    rows = min(options.batch_size, len(labels)) if fixed else None

    def run(unit: dict) -> torch.Tensor:
        """The unit's samples, computed at `rows` rows (padded with the sample ids after it) under fixed_batch."""
        start, stop = unit["ids"]
        padded = unit.get("rows", stop - start)
        batch = torch.cat([labels[start:stop], labels[:padded - (stop - start)]])
        return pipeline.generate(batch, options.seed, options.steps, options.sampler, options.cfg_scale,
                                 sample_ids=range(start, start + padded), use_vc=options.use_vc,
                                 progress=world.main, eta=options.eta)[:stop - start]

    sampled = {"images": 0}  # real (unpadded) samples this rank computed

    def shard(unit: dict) -> dict[str, np.ndarray]:
        x = run(unit)
        if pipeline.runs_engines:
            run_steps = pipeline.last_run
            engine_steps["full"] += run_steps["full"]
            engine_steps["reuse"] += run_steps["reuse"]
            engine_steps["fallback_steps"] += len(run_steps["fallback_steps"])
            for name, count in run_steps["graphs"].items():
                engine_steps["graphs"][name] = engine_steps["graphs"].get(name, 0) + count
        start, stop = unit["ids"]
        sampled["images"] += stop - start
        return {"samples": x.cpu().numpy().astype(np.float32), "labels": labels[start:stop].numpy()}

    settings = {"steps": options.steps, "sampler": options.sampler, "eta": options.eta,
                "cfg_scale": options.cfg_scale, "seed": options.seed, "plan": pipeline.plan.to_dict()}
    uses_vc = options.use_vc and pipeline.vc is not None
    key = {"sources": provenance.sha256, "model": pipeline.config.to_dict(), **settings, "vc": uses_vc}
    units = [{"ids": [start, min(start + options.batch_size, len(labels))],
              "labels": labels[start:start + options.batch_size].tolist()}
             for start in range(0, len(labels), options.batch_size)]
    if rows and units[-1]["ids"][1] - units[-1]["ids"][0] < rows:
        units[-1]["rows"] = rows
    shards = distributed.stamped_shards(out / "shards", units, key)
    pending = distributed.pending_units(shards, world)
    warmup_seconds = 0.0
    if fixed and pending:  # this rank's first shard compiles and captures at the one batch size, before the timing
        started = time.perf_counter()
        distributed.write_shard(shards[pending[0]], shard(units[pending[0]]))
        warmup_seconds = time.perf_counter() - started
        sampled["images"] = 0
        print(f"rank {world.rank}: shard {pending[0]} computed first, as the warm-up at {rows} labels a batch "
              f"({warmup_seconds:.1f} s)", file=sys.stderr)
    world.barrier()  # every rank is loaded (and warmed up): the timing covers steady sampling
    started = time.perf_counter()
    files = distributed.run_shards(out / "shards", units, shard, world, key)
    seconds = time.perf_counter() - started
    ranks = world.gather({"sampled_images": sampled["images"], "warmup_seconds": warmup_seconds,
                          "load_seconds": pipeline.load_seconds})
    try:
        distributed.require_shards_here(files, world)
    finally:
        world.close()
    if pipeline.runs_engines:
        reuse = {name: count for name, count in engine_steps["graphs"].items() if name != "full"}
        per_graph = f" ({', '.join(f'{name} {count}' for name, count in reuse.items())})" if len(reuse) > 1 else ""
        print(f"engines (rank {world.rank}): {engine_steps['full']} full steps, {engine_steps['reuse']} reuse steps"
              f"{per_graph}, {engine_steps['fallback_steps']} recomputed by the float model (non-finite)",
              file=sys.stderr)
    if not world.main:
        return None
    started = time.perf_counter()
    shown = distributed.write_merged(files, ("samples", "labels"), len(labels), out / "samples.npz",
                                     head=GRID_LIMIT)["samples"]
    caption = describe_samples(pipeline, options, provenance, uses_vc)
    _save_grid(pipeline, torch.from_numpy(shown), labels, out, decoder, per_class, class_names, caption)
    merge_seconds = time.perf_counter() - started
    config = pipeline.config

    def recorded(path: str | None) -> str | None:
        """A source's path relative to the samples folder, as manifests record theirs."""
        return path and relative_path(path, out)

    record = {
        "command": "generate", "checkpoint": recorded(provenance.checkpoint),
        "checkpoint_sha256": provenance.sha256.get("checkpoint"), "model": config.to_dict(),
        "guidance": config.guidance, "labels": labels.tolist(), **settings, "recipe": recorded(provenance.recipe),
        "engines": recorded(provenance.engines), "vc": uses_vc, "caption": caption,
        "noise_keying": "per sample: generator keyed by (seed, index)", "vae": recorded(vae),
        "device": str(pipeline.device),
        "whole_run_graphs": pipeline.run_graphs is not None,
        "world_size": world.size, "shards": {"folder": "shards", "count": len(units), "size": options.batch_size,
                                             "fixed_batch": rows},
        "sampling_seconds": seconds, "sampled_images": sum(r["sampled_images"] for r in ranks),
        "load_seconds": pipeline.load_seconds, "warmup_seconds": warmup_seconds, "merge_seconds": merge_seconds,
        "ranks": ranks,
        "engine_steps_rank0": engine_steps if pipeline.runs_engines else None,
        "versions": library_versions(),
    }
    write_json(out / "config.json", record)
    return record


def describe_samples(pipeline: Pipeline, options: SamplingOptions, provenance: Provenance, uses_vc: bool) -> str:
    """What made the samples, for grid.png's caption and config.json: the cache plan's `describe()`, the
    precision (the recipe preset, with the engine backend; "float" for an unquantized model), VC, sampler, steps,
    CFG scale and seed."""
    if pipeline.manifest is not None:
        precision = f"{(pipeline.manifest.recipe or {}).get('preset', 'float')} ({pipeline.manifest.backend} engines)"
    elif provenance.recipe:
        precision = f"{QuantRecipe.load(provenance.recipe).preset} (fake quant)"
    else:  # a fake-quant model handed over without its recipe still shows ModelOpt's quantizer modules
        quantized = any(type(m).__name__ == "TensorQuantizer" for m in pipeline.denoiser.modules())
        precision = "fake quant" if quantized else "float"
    eta = f" eta {options.eta:g}" if options.eta else ""
    return CAPTION_SEPARATOR.join([
        pipeline.plan.describe(), precision + (" + VC" if uses_vc else ""), f"{options.sampler}{eta} {options.steps} "
        "steps", f"CFG {options.cfg_scale:g}", f"seed {options.seed}"])


def _save_grid(pipeline: Pipeline, shown: torch.Tensor, labels: torch.Tensor, out: Path, vae,
               per_class: int | None, class_names: Sequence[str], caption: str) -> None:
    """out/grid.png of the `shown` samples, when they are images or the loaded `vae` decodes them, with `caption`
    above."""
    if vae:
        images = decode_latents(shown.to(pipeline.device), vae).cpu()
    elif has_image_space(pipeline.config):
        images = model_to_images(shown, pipeline.config)
    else:
        return
    captions = None
    if per_class and per_class > 1:  # one row per requested label, captioned with its class name
        captions = [class_names[k] if k < len(class_names) else f"class {k}" for k in labels[::per_class].tolist()]
    save_grid(to_uint8(images), out / "grid.png", columns=per_class if captions else None, captions=captions,
              title=caption)
