"""A first reading of faithful caching on the shipped Fashion-MNIST reference DiT (issue 14): interval-3 reuse vs
forecast order 1 and 2 (float32 and bf16 factors) vs searched plans at compute fractions 0.5 and 0.34, under DDPM-50
and DDIM-50, CFG 1.5, full precision (the cache plan's own cost). Every row shares the noise of its sampler's
uncached `fp` row (labels i % 10, sample i keyed by (seed, i)); FD against the classifier's test-set statistics,
PSNR / SSIM against the `fp` row.

Run on a GPU: resumable (each finished row kept in --state). Writes benchmarks/results/forecast-reading-<card>.json
(an object with a list `rows`) and the .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from _common import generate_images, table, write_results
from qandc.artifacts import sha256_file, write_json
from qandc.bench import card_name, device_name
from qandc.calibration.plan_search import auto_plan, parse_auto
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.model.dit import branch_flops
from qandc.sampling import CachePlan

STEPS = 50
SPECS = ["none", "interval=3", "interval=3,forecast=1", "interval=3,forecast=2", "interval=3,forecast=2,factors=bf16",
         "interval=2", "interval=2,forecast=1", "auto:compute=0.5", "auto:compute=0.5,forecast=1",
         "auto:compute=0.34", "auto:compute=0.34,forecast=1", "auto:compute=0.34,forecast=2"]


def plan_of(spec: str, model, sampler: str, cfg_scale: float, seed: int, search_samples: int):
    """The plan of a spec; searched plans on `search_samples` trajectories of seeds other than the rows'."""
    if not spec.startswith("auto"):
        return CachePlan.parse(spec), None
    plan, summary = auto_plan(model, parse_auto(spec), STEPS, sampler, cfg_scale, seed + 1000, search_samples)
    return plan, summary


def row_file(state: Path, sampler: str, spec: str) -> Path:
    return state / "rows" / f"{sampler}-{re.sub(r'[^a-z0-9.]+', '-', spec)}.json"


def markdown(rows, meta) -> str:
    title = (f"# Faithful caching on the reference model ({meta['n']} samples a row, {STEPS} steps, CFG "
             f"{meta['cfg_scale']}, full precision, {meta['card']})")
    header = ["sampler", "cache", "compute fraction", "FD", "FD / fp", "class accuracy", "PSNR vs fp (dB)",
              "SSIM vs fp"]
    cells = [[r["sampler"], r["cache"], f"{r['compute_fraction']:.3f}", f"{r['fd']:.3f}", f"{r['fd_ratio_vs_fp']:.2f}",
              f"{r['class_accuracy']:.4f}", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"] for r in rows]
    return "\n".join([title, "", *table(header, cells)]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--search-samples", type=int, default=8, help="trajectories a plan search measures")
    parser.add_argument("--samplers", nargs="*", default=["ddim", "ddpm"])
    parser.add_argument("--specs", nargs="*", default=SPECS, help="cache specs to run (default all; `none` first)")
    parser.add_argument("--state", default="/tmp/qandc-forecast-reading")
    parser.add_argument("--out", help="default benchmarks/results/forecast-reading-<card>.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = card_name()
    out = args.out or str(Path(__file__).parent / "results" / f"forecast-reading-{card}.json")
    state = Path(args.state)
    (state / "rows").mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
    flops = branch_flops(model.config)
    for sampler in args.samplers:
        for spec in args.specs:
            path = row_file(state, sampler, spec)
            if path.exists():
                continue
            start = time.time()
            plan, search = plan_of(spec, model, sampler, args.cfg_scale, args.seed, args.search_samples)
            images, labels = generate_images(model, args.n, STEPS, sampler, plan, args.cfg_scale, args.seed,
                                             args.batch_size)
            if spec == "none":
                np.save(state / f"fp-{sampler}.npy", images)
            result = score(images, labels, np.load(state / f"fp-{sampler}.npy"))
            row = {"sampler": sampler, "cache": spec, "plan": plan.to_dict(),
                   "compute_fraction": plan.compute_fraction(STEPS, flops), "fd": result["fd"],
                   "class_accuracy": result["class_accuracy"], "psnr": result["psnr"], "ssim": result["ssim"],
                   "n": result["n"], "search": search, "seconds": time.time() - start}
            write_json(path, row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("plan", "search")}), flush=True)
    rows = []
    for sampler in args.samplers:
        for spec in SPECS:
            if row_file(state, sampler, spec).exists():
                rows.append(json.loads(row_file(state, sampler, spec).read_text()))
    fp = {r["sampler"]: r["fd"] for r in rows if r["cache"] == "none"}
    for r in rows:
        r["fd_ratio_vs_fp"] = r["fd"] / fp[r["sampler"]] if r["sampler"] in fp else float("nan")
    meta = {"card": device_name(device), "n": args.n,
            "cfg_scale": args.cfg_scale, "seed": args.seed, "steps": STEPS, "search_samples": args.search_samples,
            "search_seed": args.seed + 1000, "matmul": "fp32 with TF32" if device.type == "cuda" else "fp32",
            "torch": torch.__version__, "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT)}
    write_results(out, meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
