"""The Q&C ablation on the shipped Fashion-MNIST reference DiT (50 steps, DDPM by default, CFG 1.5, 10k samples, labels
i % 10, seed 0, every row sharing the noise of the `fp` row) under one cache plan, `--plan` (default: the default of
`qandc calibrate` / `run`, a plan search). A searched plan (`auto...`) is searched once per sampler, on trajectories
of other seeds than the rows' (seed + 1000), and every row of that plan, its calibrations included, uses it.

Rows: fp, cache (the plan alone), quant-<preset> (no cache); for W8A8-INT8, W8A8-FP8 and W4A8 naive (uniform
selector, no VC), vc (uniform + VC), tap, tap+vc; then selectors at equal size (kmeans, random; W8A8-INT8) and tap+vc
with the least-squares forms of VC (mse, nsr) beside the default (var). PSNR / SSIM are against the `fp` row.

Run on a GPU (with nvidia-modelopt): resumable, each finished recipe and row kept in --state, in a folder per sampler
and plan (the rows without a cache in one per sampler, shared by every plan), so it runs over several 10-minute
commands (--budget-s: no row starts after it; exit code 3: rerun to resume); a folder made with other settings is
refused. The GPU machine keeps nothing between sessions: --seed-from ablation.json starts a new state from the rows
and the searched plan a committed JSON holds (the fp row's images, the PSNR / SSIM reference, are sampled again).
Writes benchmarks/results/ablation.json (an object with a list `rows`, the finished ones) and ablation.md.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from _common import generate_images, ran_on, seed_state, table, write_results
from qandc.artifacts import read_json, sha256_file, write_json
from qandc.calibration import CalibrationSettings, apply_recipe, calibrate, fit_vc
from qandc.calibration.plan_search import auto_plan, parse_auto
from qandc.formats.recipe import VarianceCompensation, load_vc
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.model.dit import branch_flops
from qandc.sampling import CachePlan
from qandc.sampling.plan import DEFAULT_PLAN_SEARCH

STEPS = 50
SEARCH_SEED_OFFSET = 1000  # searched plans are measured on seed + this, never on the rows' noise
PRESETS = (("int8", "w8a8-int8"), ("fp8", "w8a8-fp8"), ("w4a8", "w4a8"))
# recipe name -> (preset, selector, calibrated under the plan (else without a cache), VC form)
RECIPES = {
    f"{short}-{variant}": (preset, selector, cached, vc)
    for short, preset in PRESETS
    for variant, selector, cached, vc in (("nocache", "uniform", False, "none"), ("uniform", "uniform", True, "var"),
                                          ("tap", "tap", True, "var"), ("kmeans", "kmeans", True, "none"),
                                          ("random", "random", True, "none"))
}
# row name, preset, recipe (None: full precision), under the plan (else no cache), VC ("recipe": the recipe's table,
# or a form to refit); the rows the ablation is about first, so a partial run holds them
ROWS = [("fp", "none", None, False, None), ("cache", "none", None, True, None)]
for _short, _preset in PRESETS:
    ROWS += [(f"quant-{_short}", _preset, f"{_short}-nocache", False, None),
             ("naive", _preset, f"{_short}-uniform", True, None), ("vc", _preset, f"{_short}-uniform", True, "recipe"),
             ("tap", _preset, f"{_short}-tap", True, None), ("tap+vc", _preset, f"{_short}-tap", True, "recipe")]
ROWS += [("kmeans", "w8a8-int8", "int8-kmeans", True, None), ("random", "w8a8-int8", "int8-random", True, None),
         ("tap+vc-mse", "w8a8-int8", "int8-tap", True, "mse"), ("tap+vc-nsr", "w8a8-int8", "int8-tap", True, "nsr"),
         ("tap+vc-mse", "w8a8-fp8", "fp8-tap", True, "mse"), ("tap+vc-nsr", "w8a8-fp8", "fp8-tap", True, "nsr")]


def row_key(name: str, preset: str) -> str:
    return f"{name}@{preset}"


def state_folder(state: Path, sampler: str, spec: str, settings: dict) -> Path:
    """The folder of a sampler and plan spec ("none": the rows without a cache), holding `settings`; one made with
    other settings is refused."""
    folder = state / f"{sampler}-{re.sub(r'[^a-z0-9.]+', '-', spec.lower())}"
    stamp = {"sampler": sampler, "plan_spec": spec, **settings}
    path = folder / "settings.json"
    if path.is_file() and read_json(path) != stamp:
        raise SystemExit(f"{path}: made with other settings than {json.dumps(stamp)}; use another --state")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, stamp)
    return folder


def plan_of(spec: str, model, sampler: str, cfg_scale: float, seed: int, search_samples: int, folder: Path):
    """(plan, search summary or None) of a spec; a searched plan is searched once, on `search_samples` trajectories
    of seed + SEARCH_SEED_OFFSET, and kept in folder/plan.json."""
    if not spec.startswith("auto"):
        return CachePlan.parse(spec), None
    path = folder / "plan.json"
    if not path.is_file():
        plan, summary = auto_plan(model, parse_auto(spec), STEPS, sampler, cfg_scale, seed + SEARCH_SEED_OFFSET,
                                  search_samples)
        write_json(path, {"spec": spec, "search_seed": seed + SEARCH_SEED_OFFSET, "search_samples": search_samples,
                          "plan": plan.to_dict(), "search": summary})
    stored = read_json(path)
    return CachePlan.from_dict(stored["plan"]), stored["search"]


def seed(folders: dict[bool, Path], summary: dict) -> int:
    """The state files an ablation JSON of the same settings gives back: its card, rows and searched plan; returns
    how many were missing."""
    files = {folders[False].parent / "device.json": {"device_name": summary["card"], "torch": summary["torch"]}}
    files.update({folders[row["cache"] != "none"] / "rows" / f"{row_key(row['name'], row['preset'])}.json": row
                  for row in summary["rows"]})
    if summary["plan_search"] is not None:
        files[folders[True] / "plan.json"] = {"spec": summary["plan_spec"], "search_seed": summary["search_seed"],
                                              "search_samples": summary["search_samples"], "plan": summary["plan"],
                                              "search": summary["plan_search"]}
    return seed_state(files)


def plan_name(meta: dict) -> str:
    """The plan as the table's title names it: its spec and, for a searched one, what the search chose."""
    if meta["plan_spec"] == meta["plan_describe"]:
        return meta["plan_spec"]
    return f"{meta['plan_spec']} → {meta['plan_describe']}"


def markdown(rows, meta) -> str:
    title = (f"# Q&C ablation on the reference model ({meta['n']} samples a row, {meta['sampler'].upper()}-{STEPS}, "
             f"CFG {meta['cfg_scale']}, cache plan {plan_name(meta)}, compute fraction "
             f"{meta['compute_fraction']:.3f}, {meta['card']})")
    header = ["name", "preset", "plan", "FD", "class accuracy", "PSNR vs fp (dB)", "SSIM vs fp", "calibration"]
    cells = [[r["name"], r["preset"], r["plan_describe"], f"{r['fd']:.3f}", f"{r['class_accuracy']:.4f}",
              f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", r.get("calibration") or "–"] for r in rows]
    return "\n".join([title, "", *table(header, cells)]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN_SEARCH,
                        help=f"cache spec of the cached rows, fixed or searched (default {DEFAULT_PLAN_SEARCH})")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--n", type=int, default=10_000, help="samples a row (default 10000)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2500)
    parser.add_argument("--budget", type=int, default=800, help="calibration samples (default 800)")
    parser.add_argument("--pool-samples", type=int, default=400)
    parser.add_argument("--vc-samples", type=int, default=256)
    parser.add_argument("--search-samples", type=int, default=8, help="trajectories a plan search measures")
    parser.add_argument("--only", nargs="*", help="row keys name@preset to run (default all)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no row after this many seconds")
    parser.add_argument("--state", default="/tmp/qandc-ablation")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ablation.json"))
    parser.add_argument("--seed-from", help="an ablation JSON of these settings whose rows a new state starts from")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    settings = {"n": args.n, "cfg_scale": args.cfg_scale, "seed": args.seed, "steps": STEPS, "budget": args.budget,
                "pool_samples": args.pool_samples, "vc_samples": args.vc_samples}
    summary = read_json(Path(args.seed_from)) if args.seed_from else None
    if summary:  # refused before anything is written
        given = {"n": summary["n"], "cfg_scale": summary["cfg_scale"], "seed": summary["seed"],
                 "steps": summary["steps"], "budget": summary["calibration_budget"],
                 "pool_samples": summary["pool_samples"], "vc_samples": summary["vc_samples"],
                 "sampler": summary["sampler"], "plan": summary["plan_spec"]}
        if given != {**settings, "sampler": args.sampler, "plan": args.plan}:
            raise SystemExit(f"{args.seed_from}: rows of other settings ({json.dumps(given)}) than these")
    folders = {False: state_folder(Path(args.state), args.sampler, "none", settings),
               True: state_folder(Path(args.state), args.sampler, args.plan,
                                  {**settings, "search_samples": args.search_samples})}
    if summary:
        print(f"{seed(folders, summary)} state files from {args.seed_from}")
    measured_on = ran_on(Path(args.state), device)  # the card the state's rows ran on
    fp_model = load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
    plan, search = plan_of(args.plan, fp_model, args.sampler, args.cfg_scale, args.seed, args.search_samples,
                           folders[True])
    plans = {False: CachePlan.none(), True: plan}
    fp_images = folders[False] / "fp.npy"
    begin, unfinished = time.time(), False
    for name, preset, recipe_name, cached, vc in ROWS:
        key = row_key(name, preset)
        row_file = folders[cached] / "rows" / f"{key}.json"
        if (row_file.exists() and (name != "fp" or fp_images.exists())) or (args.only and key not in args.only):
            continue
        if time.time() - begin > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: rerun to resume", flush=True)
            unfinished = True
            break
        if name != "fp" and not fp_images.exists():
            raise SystemExit(f"{fp_images}: the fp row comes first (its images are the PSNR / SSIM reference)")
        start = time.time()
        model, correction, calibration = fp_model, None, None
        if recipe_name:
            r_preset, selector, r_cached, r_vc = RECIPES[recipe_name]
            folder = folders[r_cached] / "recipes" / recipe_name
            calibration_settings = CalibrationSettings(
                preset=r_preset, selector=selector, budget=args.budget, plan=plans[r_cached],
                pool_samples=args.pool_samples, steps=STEPS, sampler=args.sampler, cfg_scale=args.cfg_scale,
                seed=args.seed, vc=r_vc, vc_samples=args.vc_samples, batch_size=max(1, args.batch_size // 4))
            if not (folder / "recipe.json").exists():
                calibrate(fp_model, folder, calibration_settings, REFERENCE_CHECKPOINT)
                (folder / "pool.npz").unlink(missing_ok=True)  # tens of MB: the state travels back from the GPU
            model, recipe = apply_recipe(load_checkpoint(REFERENCE_CHECKPOINT).to(device), folder)
            calibration = f"{selector}, {args.budget} samples"
            if vc == "recipe":
                correction = VarianceCompensation(load_vc(folder))
                calibration += f", VC {r_vc}"
            elif vc:
                labels = torch.arange(args.vc_samples) % fp_model.config.num_classes
                correction = VarianceCompensation(fit_vc(fp_model, model, labels, STEPS, args.sampler, args.cfg_scale,
                                                         args.seed + 1, recipe.cache_plan, vc))
                calibration += f", VC {vc}"
        images, labels = generate_images(model, args.n, STEPS, args.sampler, plans[cached], args.cfg_scale,
                                         args.seed, args.batch_size, correction)
        if name == "fp":
            np.save(fp_images, images)
        result = score(images, labels, np.load(fp_images))
        row = {"name": name, "preset": preset, "cache": args.plan if cached else "none",
               "plan": plans[cached].to_dict(), "plan_describe": plans[cached].describe(), "fd": result["fd"],
               "class_accuracy": result["class_accuracy"], "psnr": result["psnr"], "ssim": result["ssim"],
               "n": result["n"], "calibration": calibration, "seconds": time.time() - start}
        write_json(row_file, row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    rows = [json.loads(path.read_text()) for path in (folders[cached] / "rows" / f"{row_key(n, p)}.json"
                                                      for n, p, _, cached, _ in ROWS) if path.exists()]
    meta = {"card": measured_on["device_name"], "n": args.n,
            "cfg_scale": args.cfg_scale, "seed": args.seed, "steps": STEPS, "sampler": args.sampler,
            "plan_spec": args.plan, "plan": plan.to_dict(), "plan_describe": plan.describe(),
            "compute_fraction": plan.compute_fraction(STEPS, branch_flops(fp_model.config)),
            "plan_search": search, "search_seed": args.seed + SEARCH_SEED_OFFSET if search else None,
            "search_samples": args.search_samples if search else None,
            "calibration_budget": args.budget, "pool_samples": args.pool_samples, "vc_samples": args.vc_samples,
            "matmul": "fp32 with TF32" if measured_on["device_name"] != "cpu" else "fp32",
            "torch": measured_on["torch"],
            "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT)}
    write_results(args.out, meta, rows, markdown(rows, meta))
    if unfinished:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
