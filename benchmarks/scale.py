"""Throughput scaling of Q&C generation over GPUs: `qandc generate --recipe` (fake quant + cache + VC) under
`torchrun --standalone --nproc-per-node K` for K = 1, 2, 4, ... on one host.

images/s is N / the sampling time rank 0 records between a barrier before sampling and one after it (process
start-up and model loading excluded); efficiency[K] = images_per_s[K] / (K * images_per_s[1]). Without --recipe, a
small recipe (W8A8-INT8, TAP, interval 3, VC) is calibrated first into --work (kept for reruns); the number of
sampling steps, the sampler and CFG come from the recipe. Needs nvidia-modelopt.

Usage: PYTHONPATH=$PWD python benchmarks/scale.py [--images 4096] [--gpus 1 2 4] [--recipe DIR]
Writes benchmarks/results/scale-<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qandc.artifacts import portable_path, read_json, write_json
from qandc.model.checkpoint import REFERENCE_CHECKPOINT

RESULTS = Path(__file__).resolve().parent / "results"


def qandc(args: list, procs: int = 0, threads: int = 1) -> None:
    """`python -m qandc ARGS`, or under `torchrun --standalone --nproc-per-node PROCS`; fails loudly."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"] if procs else ["-m"]
    command = [sys.executable, *launcher, "qandc", *map(str, args)]
    print("+", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def card_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpus = torch.cuda.device_count()
    parser.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT))
    parser.add_argument("--recipe", help="quant recipe directory (default: calibrate one into WORK/recipe)")
    parser.add_argument("--images", type=int, default=4096, help="images per run (default 4096)")
    parser.add_argument("--batch-size", type=int, default=256, help="labels per batch and shard (default 256)")
    parser.add_argument("--gpus", type=int, nargs="+",
                        default=[k for k in (1, 2, 4, 8) if k <= gpus] if gpus else [1, 2],
                        help="process counts, starting at 1 (default 1, 2, 4, 8 as far as the GPUs go; CPU: 1 2)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 8),
                        help="OMP_NUM_THREADS of every process, whatever K (default cores / 8)")
    parser.add_argument("--warmup-images", type=int, default=64,
                        help="an untimed one-process run first (kernel caches); 0 skips it (default 64)")
    parser.add_argument("--work", default="out/scale", help="recipe and generate folders (default out/scale)")
    parser.add_argument("--out", help="JSON to write (default benchmarks/results/scale-<card>.json)")
    args = parser.parse_args()
    if args.gpus[0] != 1 or len(set(args.gpus)) != len(args.gpus):
        parser.error("--gpus must start at 1 and name each count once: efficiency is relative to one process")
    if gpus and max(args.gpus) > gpus:
        parser.error(f"--gpus {max(args.gpus)}: only {gpus} GPUs are visible")
    work = Path(args.work)
    card = card_name()
    short = next((c for c in ("h100", "h200") if c in card.lower()), re.sub(r"[^a-z0-9]+", "-", card.lower()))
    out = Path(args.out or RESULTS / f"scale-{short.strip('-')}.json")

    recipe = Path(args.recipe) if args.recipe else work / "recipe"
    if not args.recipe:
        qandc(["calibrate", "--checkpoint", args.checkpoint, "--preset", "w8a8-int8", "--selector", "tap",
               "--cache", "interval=3", "--samples", "200", "--pool-samples", "24", "--vc-samples", "16",
               "--out", recipe], threads=args.threads)
    settings = read_json(recipe / "recipe.json")
    generate = ["generate", "--checkpoint", args.checkpoint, "--recipe", recipe, "--steps", settings["steps"],
                "--sampler", settings["sampler"], "--cfg-scale", settings["cfg_scale"], "--seed", 0,
                "--batch-size", args.batch_size]
    if args.warmup_images:
        shutil.rmtree(work / "warmup", ignore_errors=True)
        qandc([*generate, "--num-images", args.warmup_images, "--out", work / "warmup"], threads=args.threads)

    seconds, wall, same, first = [], [], [], None
    for k in args.gpus:
        folder = work / f"generate-{k}"
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run: no shard is skipped
        start = time.perf_counter()
        qandc([*generate, "--num-images", args.images, "--out", folder], procs=k, threads=args.threads)
        wall.append(time.perf_counter() - start)
        seconds.append(read_json(folder / "config.json")["sampling_seconds"])
        samples = np.load(folder / "samples.npz")["samples"]
        first = samples if first is None else first
        same.append(bool(np.array_equal(samples, first)))
        print(f"K={k}: {args.images / seconds[-1]:.1f} images/s ({seconds[-1]:.2f} s sampling, {wall[-1]:.1f} s "
              "wall)", file=sys.stderr)
    rates = [args.images / s for s in seconds]
    result = {
        "card": card, "gpus": args.gpus, "images_per_s": rates,
        "efficiency": [rate / (k * rates[0]) for k, rate in zip(args.gpus, rates)],
        "sampling_seconds": seconds, "command_seconds": wall, "same_samples": same,
        "config": {"images": args.images, "batch_size": args.batch_size, "checkpoint": portable_path(args.checkpoint),
                   "recipe": portable_path(recipe), "preset": settings["preset"], "plan": settings["plan"],
                   "steps": settings["steps"], "sampler": settings["sampler"], "cfg_scale": settings["cfg_scale"],
                   "threads_per_process": args.threads, "matmul": "fp32 (qandc generate's default)",
                   "timing": "rank 0, barrier before sampling to barrier after (shard writes included)",
                   "launcher": "torchrun --standalone", "torch": torch.__version__},
    }
    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("card", "gpus", "images_per_s", "efficiency")}))
    print(json.dumps({"wrote": str(out)}))


if __name__ == "__main__":
    main()
