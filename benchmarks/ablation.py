"""The Q&C ablation on the shipped Fashion-MNIST reference DiT (DDPM-50, CFG 1.5, 10k samples, labels i % 10,
seed 0, every row sharing the noise of the `fp` row), under a cache plan that costs real quality on its own
(interval 3, reuse-all). Rows: fp, cache, quant-<preset>, naive (quant + cache, uniform selector, no VC), vc, tap,
tap+vc for W8A8-INT8 and W8A8-FP8; W4A8 naive and tap+vc; selectors at equal size (kmeans, random; uniform and tap
are the naive and tap rows); and tap+vc with the least-squares forms of VC (mse, nsr) beside the default (var). PSNR / SSIM are against the `fp` row.

Run on a GPU (with nvidia-modelopt): resumable, each finished recipe and row kept in --state, so it runs over several
10-minute commands. Writes benchmarks/results/ablation.json (an object with a list `rows`) and ablation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import generate_images, write_results
from qandc.artifacts import sha256_file, write_json
from qandc.calibration import CalibrationSettings, apply_recipe, calibrate, fit_vc
from qandc.formats.recipe import VarianceCompensation, load_vc
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.sampling import CachePlan

PLAN = "interval=3"
# recipe name -> (preset, selector, cache spec, VC form)
RECIPES = {
    f"{short}-{variant}": (preset, selector, cache, vc)
    for short, preset in (("int8", "w8a8-int8"), ("fp8", "w8a8-fp8"), ("w4a8", "w4a8"))
    for variant, selector, cache, vc in (("nocache", "uniform", "none", "none"), ("uniform", "uniform", PLAN, "var"),
                                         ("tap", "tap", PLAN, "var"), ("kmeans", "kmeans", PLAN, "none"),
                                         ("random", "random", PLAN, "none"))
}
# row name, preset, recipe (None: full precision), cache spec, VC ("recipe": the recipe's table, or a form to refit)
ROWS = [("fp", "none", None, "none", None), ("cache", "none", None, PLAN, None)]
for short, preset in (("int8", "w8a8-int8"), ("fp8", "w8a8-fp8")):
    ROWS += [(f"quant-{short}", preset, f"{short}-nocache", "none", None),
             ("naive", preset, f"{short}-uniform", PLAN, None), ("vc", preset, f"{short}-uniform", PLAN, "recipe"),
             ("tap", preset, f"{short}-tap", PLAN, None), ("tap+vc", preset, f"{short}-tap", PLAN, "recipe")]
ROWS += [("naive", "w4a8", "w4a8-uniform", PLAN, None), ("tap+vc", "w4a8", "w4a8-tap", PLAN, "recipe"),
         ("kmeans", "w8a8-int8", "int8-kmeans", PLAN, None), ("random", "w8a8-int8", "int8-random", PLAN, None),
         ("tap+vc-mse", "w8a8-int8", "int8-tap", PLAN, "mse"), ("tap+vc-nsr", "w8a8-int8", "int8-tap", PLAN, "nsr"),
         ("tap+vc-mse", "w8a8-fp8", "fp8-tap", PLAN, "mse"), ("tap+vc-nsr", "w8a8-fp8", "fp8-tap", PLAN, "nsr")]


def row_key(name: str, preset: str) -> str:
    return f"{name}@{preset}"


def markdown(rows, meta) -> str:
    lines = [f"# Q&C ablation on the reference model ({meta['n']} samples a row, DDPM-50, CFG {meta['cfg_scale']}, "
             f"cache {PLAN} reuse-all, {meta['card']})", "",
             "| name | preset | FD | class accuracy | PSNR vs fp (dB) | SSIM vs fp | calibration |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['preset']} | {r['fd']:.3f} | {r['class_accuracy']:.4f} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r.get('calibration', '–')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2500)
    parser.add_argument("--budget", type=int, default=800, help="calibration samples (default 800)")
    parser.add_argument("--pool-samples", type=int, default=400)
    parser.add_argument("--vc-samples", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="row keys name@preset to run (default all)")
    parser.add_argument("--state", default="/tmp/qandc-ablation")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ablation.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    state = Path(args.state)
    (state / "rows").mkdir(parents=True, exist_ok=True)
    fp_model = load_checkpoint(REFERENCE_CHECKPOINT).to(device)
    for name, preset, recipe_name, cache, vc in ROWS:
        key = row_key(name, preset)
        row_file = state / "rows" / f"{key}.json"
        if row_file.exists() or (args.only and key not in args.only):
            continue
        start = time.time()
        model, correction, calibration = fp_model, None, None
        if recipe_name:
            r_preset, selector, r_cache, r_vc = RECIPES[recipe_name]
            folder = state / "recipes" / recipe_name
            settings = CalibrationSettings(preset=r_preset, selector=selector, budget=args.budget,
                                           plan=CachePlan.parse(r_cache), pool_samples=args.pool_samples,
                                           cfg_scale=args.cfg_scale, seed=args.seed, vc=r_vc,
                                           vc_samples=args.vc_samples, batch_size=args.batch_size // 4)
            calibrate(fp_model, folder, settings, sha256_file(REFERENCE_CHECKPOINT))
            model, recipe = apply_recipe(load_checkpoint(REFERENCE_CHECKPOINT).to(device), folder)
            calibration = f"{selector}, {args.budget} samples"
            if vc == "recipe":
                correction = VarianceCompensation(load_vc(folder))
                calibration += f", VC {r_vc}"
            elif vc:
                labels = torch.arange(args.vc_samples) % fp_model.config.num_classes
                correction = VarianceCompensation(fit_vc(fp_model, model, labels, 50, "ddpm", args.cfg_scale,
                                                         args.seed + 1, recipe.cache_plan, vc))
                calibration += f", VC {vc}"
        images, labels = generate_images(model, args.n, 50, "ddpm", CachePlan.parse(cache), args.cfg_scale,
                                         args.seed, args.batch_size, correction)
        if name == "fp":
            np.save(state / "fp.npy", images)
        result = score(images, labels, np.load(state / "fp.npy"))
        row = {"name": name, "preset": preset, "cache": cache, "fd": result["fd"],
               "class_accuracy": result["class_accuracy"], "psnr": result["psnr"], "ssim": result["ssim"],
               "n": result["n"], "calibration": calibration, "seconds": time.time() - start}
        write_json(row_file, row)
        print(json.dumps(row), flush=True)
    rows = [json.loads((state / "rows" / f"{row_key(n, p)}.json").read_text()) for n, p, *_ in ROWS
            if (state / "rows" / f"{row_key(n, p)}.json").exists()]
    meta = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "n": args.n,
            "cfg_scale": args.cfg_scale, "seed": args.seed, "steps": 50, "sampler": "ddpm", "cache_plan": PLAN,
            "calibration_budget": args.budget, "pool_samples": args.pool_samples, "vc_samples": args.vc_samples,
            "matmul": "fp32 with TF32", "torch": torch.__version__,
            "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT)}
    write_results(args.out, meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
