"""Scale-out of the engine path: `qandc generate --engines` (Inductor FP8 / INT8 / bf16 engines, CUDA graphs) under
`torchrun --standalone --nproc-per-node K` for K = 1, 2, 4, ... on one host.

For each K it records, from rank 0's config.json and the wall clock around the command:
- images/s between the barriers before and after sampling (the images of the shards computed there over
  `sampling_seconds`: shard writes included; start-up, each rank's first shard, which is its warm-up, and the merge
  excluded) and its efficiency images_per_s[K] / (K * images_per_s[1]);
- the whole command's time and its efficiency command_seconds[1] / (K * command_seconds[K]), with the overhead
  broken down: engine load (programs + the compile cache), warm-up (each rank's first shard, compiling from the cache
  and capturing the CUDA graphs at the one batch size: `--fixed-batch`, so no rank compiles mid-run; its images are
  kept; `compile_capture_seconds` estimates its part beyond a steady shard), the rank-0 merge (streamed shard by
  shard into samples.npz, plus grid.png), and the rest (interpreter and torch import, torchrun, rendezvous, waiting
  for the slowest rank, exit; each rank's load and warm-up are in config.json's `ranks`);
- the samples' sha256 and whether they equal K=1's bitwise (else the largest difference).
Each run starts with an empty Inductor cache folder (TORCHINDUCTOR_CACHE_DIR), as on a fresh host: only the engine
folder's compile cache is there. The engines are built once (the same folder for every K and rank) and checked to be
unchanged after every run.

Without --engines, Inductor engines of --checkpoint are built into WORK: --precision (a quick ModelOpt max
calibration for w8a8-*, as `qandc bench` makes) under --plan (default: `default-shape`, the shape of the plan the
default search picks, qandc.sampling.plan.default_plan_shape), DDPM-50, CFG 1.5, compiled for 2 x --batch-size rows.
--engines takes any engine folder instead (tiny ONNX Runtime engines for a CPU smoke test, gloo).

Resumable: each K's result is kept in WORK/state/ (a rerun skips it); --budget-s starts no K after that many seconds
and exits 3 (rerun to resume).

Usage: PYTHONPATH=$PWD python benchmarks/scale.py [--precision w8a8-fp8] [--plan default-shape] [--images 50000]
       [--gpus 1 2 4] [--engines DIR]
Writes benchmarks/results/scale-engines-<card>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qandc.artifacts import portable_path, read_json, write_json
from qandc.bench import card_name, device_name
from qandc.model.checkpoint import REFERENCE_CHECKPOINT

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("bf16", "w8a8-fp8", "w8a8-int8")


def torchrun_qandc(args: list, procs: int, env: dict) -> float:
    """`torchrun --standalone --nproc-per-node PROCS -m qandc ARGS`; fails loudly; returns its wall seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m",
               "qandc", *map(str, args)]
    print("+", " ".join(command), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **env})
    return time.perf_counter() - start


def build_engines(checkpoint: str, precision: str, plan: str, batch_size: int, work: Path) -> Path:
    """Inductor engines of the checkpoint at `precision` under the cache spec `plan` (bench's `default-shape` or a
    cache spec), compiled for 2 x batch_size rows, in WORK (kept: a rerun reuses them): the bench's
    `config_engines`."""
    from qandc.bench import config_engines
    from qandc.model import load_checkpoint

    model = load_checkpoint(checkpoint).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    folder, _ = config_engines(f"{Path(checkpoint).stem}-b{batch_size}", model, precision, plan, work,
                               [2 * batch_size])
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def folder_state(folder: Path) -> dict:
    """Every file of a folder with its size and mtime: a rebuild or rewrite changes it."""
    return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".qandc.lock")}


def samples_digest(folder: Path) -> tuple[str, np.ndarray]:
    samples = np.load(folder / "samples.npz")["samples"]
    return hashlib.sha256(samples.tobytes()).hexdigest(), samples


def run_k(k: int, engines: Path, args, work: Path) -> dict:
    """One generate run on K processes, from a fresh output folder and an empty Inductor cache folder."""
    folder = work / f"generate-{k}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: no shard is kept
    cache = work / f"inductor-cache-{k}"
    shutil.rmtree(cache, ignore_errors=True)
    before = folder_state(engines)
    wall = torchrun_qandc(["generate", "--engines", engines, "--num-images", args.images, "--batch-size",
                           args.batch_size, "--seed", 0, "--fixed-batch", "--out", folder], k,
                          {"OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CACHE_DIR": str(cache.resolve())})
    config = read_json(folder / "config.json")
    sha, _ = samples_digest(folder)
    parts = {name: config[f"{name}_seconds"] for name in ("load", "warmup", "sampling", "merge")}
    if not config["sampled_images"]:
        raise SystemExit(f"K={k}: no shard left after each rank's warm-up shard; raise --images")
    row = {"gpus": k, "world_size": config["world_size"], "sampled_images": config["sampled_images"],
           "images_per_s": config["sampled_images"] / parts["sampling"],
           "command_seconds": wall, **{f"{name}_seconds": s for name, s in parts.items()},
           "other_seconds": wall - sum(parts.values()), "samples_sha256": sha,
           "engines_unchanged": folder_state(engines) == before, "fixed_batch": config["shards"]["fixed_batch"],
           "slowest_rank_load_seconds": max(r["load_seconds"] for r in config["ranks"]),
           "slowest_rank_warmup_seconds": max(r["warmup_seconds"] for r in config["ranks"]),
           "engine_steps_rank0": config["engine_steps_rank0"]}
    # the warm-up is one shard: what it took beyond a steady shard of this rank is compiling and capturing
    row["compile_capture_seconds"] = parts["warmup"] - args.batch_size * k / row["images_per_s"]
    print(f"K={k}: {row['images_per_s']:.1f} images/s ({parts['sampling']:.2f} s sampling), {wall:.1f} s command "
          f"(load {parts['load']:.1f}, warm-up {parts['warmup']:.1f}, merge {parts['merge']:.1f}, other "
          f"{row['other_seconds']:.1f})", file=sys.stderr)
    return row


def compare_to_one(rows: list[dict], work: Path) -> None:
    """Mark each row's samples as bitwise K=1's or not (with the largest absolute difference)."""
    _, one = samples_digest(work / "generate-1")
    for row in rows:
        row["same_samples"] = row["samples_sha256"] == rows[0]["samples_sha256"]
        if not row["same_samples"]:
            _, samples = samples_digest(work / f"generate-{row['gpus']}")
            row["max_abs_diff"] = float(np.abs(samples - one).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpus = torch.cuda.device_count()
    parser.add_argument("--engines", help="an engine folder to run (default: build Inductor engines into WORK)")
    parser.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT), help="what the engines are built from "
                        "(default: the reference model)")
    parser.add_argument("--precision", choices=PRECISIONS, default="w8a8-fp8",
                        help="precision of the engines built (default w8a8-fp8)")
    parser.add_argument("--plan", default="default-shape",
                        help="cache spec of the engines built (default default-shape: default_plan_shape(50))")
    parser.add_argument("--images", type=int, default=50000, help="images per run (default 50000)")
    parser.add_argument("--batch-size", type=int, default=256, help="labels per batch and shard (default 256)")
    parser.add_argument("--gpus", type=int, nargs="+",
                        default=[k for k in (1, 2, 4, 8) if k <= gpus] if gpus else [1, 2],
                        help="process counts, starting at 1 (default 1, 2, 4, 8 as far as the GPUs go; CPU: 1 2)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 8),
                        help="OMP_NUM_THREADS of every process, whatever K (default cores / 8)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no K after this many seconds; exit 3, rerun to resume (default 480)")
    parser.add_argument("--work", default="out/scale-engines", help="engines, runs and state (default "
                        "out/scale-engines)")
    parser.add_argument("--out", help="JSON to write (default benchmarks/results/scale-engines-<card>.json)")
    args = parser.parse_args()
    if args.gpus[0] != 1 or len(set(args.gpus)) != len(args.gpus):
        parser.error("--gpus must start at 1 and name each count once: efficiency is relative to one process")
    if gpus and max(args.gpus) > gpus:
        parser.error(f"--gpus {max(args.gpus)}: only {gpus} GPUs are visible")
    begin = time.time()
    work = Path(args.work)
    card = device_name()
    out = Path(args.out or RESULTS / f"scale-engines-{card_name(card)}.json")

    engines = Path(args.engines) if args.engines else build_engines(args.checkpoint, args.precision, args.plan,
                                                                     args.batch_size, work)
    manifest = read_json(engines / "manifest.json")
    settings = {"images": args.images, "batch_size": args.batch_size, "threads_per_process": args.threads,
                "engines_manifest_sha256": hashlib.sha256((engines / "manifest.json").read_bytes()).hexdigest()}
    state = work / "state"
    rows = []
    for k in args.gpus:
        path = state / f"k{k}.json"
        kept = read_json(path) if path.is_file() else None
        if kept and kept["settings"] == settings:
            rows.append(kept["row"])
            continue
        if time.time() - begin > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent before K={k}: rerun to resume", file=sys.stderr)
            sys.exit(3)
        rows.append(run_k(k, engines, args, work))
        write_json(path, {"settings": settings, "row": rows[-1]})
    compare_to_one(rows, work)
    one = rows[0]
    for row in rows:
        k = row["gpus"]
        row["efficiency"] = row["images_per_s"] / (k * one["images_per_s"])
        row["command_efficiency"] = one["command_seconds"] / (k * row["command_seconds"])
    result = {
        "card": card, "gpus": args.gpus, "images_per_s": [r["images_per_s"] for r in rows],
        "efficiency": [r["efficiency"] for r in rows], "command_efficiency": [r["command_efficiency"] for r in rows],
        "same_samples": [r["same_samples"] for r in rows], "rows": rows,
        "config": {**settings, "engines": portable_path(engines), "backend": manifest["backend"],
                   "precision": (manifest.get("recipe") or {}).get("preset", "float"), "plan": manifest["plan"],
                   "sampler": manifest["sampler"], "checkpoint": portable_path(args.checkpoint),
                   "launcher": "torchrun --standalone", "torch": torch.__version__,
                   "timing": "images/s: rank 0, barrier before sampling to barrier after (shard writes included); "
                             "command: wall clock around torchrun; other = command - load - warmup - sampling - "
                             "merge (interpreter, imports, rendezvous, exit)",
                   "inductor_cache": "an empty TORCHINDUCTOR_CACHE_DIR per run: only the engines' compile cache"},
    }
    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("card", "gpus", "images_per_s", "efficiency", "command_efficiency",
                                             "same_samples")}))
    print(json.dumps({"wrote": portable_path(out)}))


if __name__ == "__main__":
    main()
