"""The baseline table of the shipped Fashion-MNIST reference DiT: FD and class accuracy of 10k samples per sampler
setting (all with CFG), and cache-only runs at DDPM-50 scored against the uncached DDPM-50 run (PSNR / SSIM), with
the same labels (i % 10), seeds and noise. Run on a GPU (about a minute a row there; hours on 2 CPU cores).

Resumable: each finished row is kept in --state and skipped on a rerun, so the table can be built over several
10-minute commands. Writes benchmarks/results/reference-model.json (an object with a list `rows`) and a markdown
table beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import generate_images, table, write_results
from qandc.artifacts import ASSETS, sha256_file, write_json
from qandc.bench import device_name
from qandc.metrics.classifier import WEIGHTS
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.sampling import CachePlan

ROWS = [  # name, steps, sampler, cache spec
    ("ddpm-250", 250, "ddpm", "none"),
    ("ddpm-100", 100, "ddpm", "none"),
    ("ddpm-50", 50, "ddpm", "none"),
    ("ddim-50", 50, "ddim", "none"),
    ("ddpm-50-cache-interval2", 50, "ddpm", "interval=2"),
    ("ddpm-50-cache-interval3", 50, "ddpm", "interval=3"),
    ("ddpm-50-cache-interval3-mlp", 50, "ddpm", "interval=3,branches=mlp"),
]
REFERENCE_ROW = "ddpm-50"  # the uncached run the cache-only rows are compared with


def markdown(rows: list[dict], meta: dict) -> str:
    title = (f"# Reference model baseline ({meta['n']} samples per row, CFG {meta['cfg_scale']}, seed {meta['seed']}, "
             f"{meta['card']})")
    cells = [[r["name"], str(r["steps"]), f"{r['fd']:.3f}", f"{r['class_accuracy']:.4f}",
              f"{r['psnr']:.2f}" if "psnr" in r else "–", f"{r['ssim']:.4f}" if "ssim" in r else "–",
              f"{r['seconds']:.0f}"] for r in rows]
    lines = [title, "", *table(["name", "steps", "FD", "class accuracy", "PSNR (dB)", "SSIM", "seconds"], cells)]
    lines += ["", f"PSNR / SSIM of cache rows against `{REFERENCE_ROW}` (same labels, seeds and noise). "
              "FD: Fréchet distance to the 10k Fashion-MNIST test images in the reference classifier's features. "
              "Seconds: wall time of the row, per-sample CPU noise generation included: not a speed measurement."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples per row (default 10000)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2500)
    parser.add_argument("--rows", nargs="*", help="only these rows (default: all)")
    parser.add_argument("--state", default="/tmp/qandc-baseline", help="folder keeping finished rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reference-model.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # recorded below
    card = device_name(device)
    model = load_checkpoint(REFERENCE_CHECKPOINT).to(device)
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    for name, steps, sampler, cache in ROWS:
        row_file = state / f"{name}.json"
        if (args.rows and name not in args.rows) or row_file.exists():
            continue
        start = time.time()
        images, labels = generate_images(model, args.n, steps, sampler, CachePlan.parse(cache), args.cfg_scale,
                                         args.seed, args.batch_size)
        seconds = time.time() - start
        reference = None
        if name == REFERENCE_ROW:
            np.save(state / f"{name}.npy", images)
        elif cache != "none":
            reference = np.load(state / f"{REFERENCE_ROW}.npy")
        result = score(images, labels, reference)
        row = {"name": name, "steps": steps, "sampler": sampler, "cache": cache, "fd": result["fd"],
               "class_accuracy": result["class_accuracy"], "n": result["n"], "seconds": seconds}
        if reference is not None:
            row.update(psnr=result["psnr"], ssim=result["ssim"], mse=result["mse"], reference=REFERENCE_ROW)
        write_json(row_file, row)
        print(json.dumps(row), flush=True)
    rows = [json.loads((state / f"{name}.json").read_text()) for name, *_ in ROWS if (state / f"{name}.json").exists()]
    meta = {"card": card, "n": args.n, "cfg_scale": args.cfg_scale, "seed": args.seed, "labels": "i % 10",
            "noise": "per sample, keyed by (seed, i)", "matmul": "fp32 with TF32" if device.type == "cuda" else "fp32",
            "torch": torch.__version__, "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT),
            "classifier_sha256": sha256_file(ASSETS / WEIGHTS)}
    write_results(args.out, meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
