"""The measured speed/quality front of qandc on the shipped Fashion-MNIST reference DiT (issue 15): how fast at the
quality a user needs.

Points: methods {plain interval reuse (intervals 2, 3, 4 only: 0.5, 0.34, 0.26 of the compute), searched plan,
searched plan + forecast} × compute fractions {1, 0.5, 0.4, 0.33, 0.25} (each searched within +0.03; under DDIM
searched + forecast at 0.2, 0.16 and 0.13 too, for the moonshot) × precisions
{bf16, W8A8-FP8 TAP+VC, W8A8-INT8 TAP+VC}, DDIM-50 and DDPM-50, CFG 1.5. Searched plans come from
`auto:compute=F[,forecast=K]` on search trajectories of other seeds; `searched+forecast` is screened at orders 1
and 2 in bf16, and the quantized precisions take the better order. Every point's samples share the noise of the
float32 model's (labels i % 10, sample i keyed by (seed, i)).

1. screen: every point at --screen-n samples on the PyTorch path (bf16 autocast; ModelOpt fake quant with a TAP
   recipe calibrated on the point's own plan and its VC table), FD against the classifier's test statistics, its
   ratio to the float32 PyTorch model's FD at the same sampler and seeds.
2. measure: per sampler, the points a user would pick — for each precision the cheapest screened point within
   1.10x and within 1.25x of full precision's FD, and no cache — through the Inductor engines that deploy (bf16 with
   real FP8 / INT8 kernels, CUDA graphs, VC) at --measure-n samples, FD with a 95% bootstrap interval; images/s over
   the whole sampling runs of --batch images (twice the rows with CFG) after a warm-up batch. The bf16 no-cache
   engines of each sampler are timed again in every command (a chunk of the work) as that chunk's reference.
   Points measured once and no longer picked (a cheaper point screened since) stay in the JSON. With
   --fp8-kernels fastaccum the W8A8-FP8 points run engines whose FP8 GEMMs skip the float32 promotion of their
   running sum, with --fp8-kernels fused those of issue 17's fastest step (bench.FUSED_FP8: fused MLP and norm
   kernels, fast accumulation; fused-cublaslt: cuBLASLt's GELU epilogue for the MLPs instead of the Triton kernel):
   rows of their own, compared with the promoting ones in `fp8_kernels`.
3. summary: front-<card>.json (`rows`: screened and measured points; `peers` from benchmarks/front_peers.py's JSON;
   `targets`; `searches`: every plan with its search) and front-<card>.png.

Resumable: plans, recipes and rows are kept in --state; --budget-s stops between points (one GPU command is at most
10 minutes). Engines are rebuilt in --work when missing. The GPU machine keeps nothing between sessions: --seed-from
front-<card>.json gives a new state the rows, plans, searches and speed chunks that JSON holds (images, recipes and
engines are computed again where a phase needs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _common import generate_images, ran_on, seed_state
from qandc.artifacts import atomic_path, sha256_file, write_json
from qandc.bench import FUSED_FP8, card_name, device_name, fp8_suffix
from qandc.calibration import CalibrationSettings, apply_recipe, calibrate
from qandc.calibration.plan_search import FAMILY, PlanSearch, auto_plan
from qandc.engines import cublaslt_fp8
from qandc.errors import QandcError
from qandc.formats.recipe import VarianceCompensation, load_vc
from qandc.images import model_to_images, to_uint8
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.model.dit import branch_flops
from qandc.sampling import CachePlan, SamplerDefaults

STEPS, CFG, SEED, SEARCH_SEED = 50, 1.5, 0, 1000
FRACTIONS = (1.0, 0.5, 0.4, 0.33, 0.25)
TOLERANCE = 0.03
INTERVALS = {0.5: 2, 0.33: 3, 0.25: 4}
# below the grid, for the moonshot, searched + forecast only and only under DDIM (DDPM's best at 0.26 was 8x full
# precision's FD): 0.13 landed at 0.16 (8 full steps, forecast 2: 3.87x at 0.97x FD, front-h200.json); >= 4x at a
# reuse step's cost of 0.09 of a full one needs 7 full steps of 50 (0.11 + TOLERANCE = 0.14, the least the search
# allows), where 7 evenly spaced ones with forecast 2 held about the search error of that 8-step plan (3.9e-3, 3.6e-3)
BEYOND = {"ddim": (0.2, 0.16, 0.13, 0.11)}
PRECISIONS = ("bf16", "w8a8-fp8", "w8a8-int8")
SAMPLERS = ("ddim", "ddpm")
QUALITY_TARGETS = (1.10, 1.25)
ROOT = Path(__file__).resolve().parent.parent
# --fp8-kernels: build_inductor's FP8 options of each variant of the W8A8-FP8 engines
# (fused: the MLP's Triton kernel; fused-cublaslt: the same engines with cuBLASLt's GELU epilogue for their MLPs,
# qandc.engines.cublaslt_fp8, which needs nvmath-python)
FP8_KERNELS = {"promoting": {}, "fastaccum": {"fp8_fast_accum": True}, "fused": FUSED_FP8, "fused-cublaslt": FUSED_FP8}
# a measured row's `path` -> its state folder: the FP8 variants' rows are kept apart, out of the front, its targets
# and its plot
MEASURED = {"inductor-engines": "measure",
            **{f"inductor-engines-{v}": f"measure-{v}" for v in FP8_KERNELS if v != "promoting"}}


@dataclass(frozen=True)
class Point:
    sampler: str
    method: str       # none | interval | searched | searched+forecast
    fraction: float   # the compute fraction aimed at
    forecast: int
    precision: str

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.method.replace('+', '-')}-{self.fraction:g}-f{self.forecast}-{self.precision}"


def points(sampler: str, precision: str, orders) -> list[Point]:
    """The grid of one sampler and precision; `orders(fraction)`: the forecast orders of searched+forecast there."""
    grid = [Point(sampler, "none", 1.0, 0, precision)]
    for fraction in FRACTIONS[1:]:
        if fraction in INTERVALS:
            grid.append(Point(sampler, "interval", fraction, 0, precision))
        grid.append(Point(sampler, "searched", fraction, 0, precision))
        grid += [Point(sampler, "searched+forecast", fraction, k, precision) for k in orders(fraction)]
    for fraction in BEYOND.get(sampler, ()):
        grid += [Point(sampler, "searched+forecast", fraction, k, precision) for k in orders(fraction)]
    return grid


class Front:
    """The state folder and the model: plans, recipes, reference images and rows, each computed once."""

    def __init__(self, state: Path, work: Path, device: torch.device, search_samples: int, calibration: dict,
                 steps: int = STEPS, fp8_kernels: str = "promoting"):
        self.state, self.work, self.device, self.steps = state, work, device, steps
        self.search_samples, self.calibration = search_samples, calibration
        self.fp8_kernels = fp8_kernels
        for sub in ("plans", "recipes", "reference", "screen", *MEASURED.values(), "speed"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        self.ran_on = ran_on(state, device)  # the card the state's rows ran on
        self.model = load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
        self.flops = branch_flops(self.model.config)

    # --- plans and recipes ---------------------------------------------------------------------------------------
    def plan(self, point: Point, search_stale: bool = False) -> CachePlan:
        """The point's plan: searched once and kept in the state; `search_stale`: searched again where the kept one
        came from another candidate family (the screen phase; the others report what the state holds)."""
        if point.method == "none":
            return CachePlan.none()
        if point.method == "interval":
            return CachePlan.interval(INTERVALS[point.fraction])
        search = PlanSearch("compute", round(point.fraction + TOLERANCE, 4), point.forecast)
        path = self.plan_path(point)
        kept = json.loads(path.read_text()) if path.exists() else None
        if kept is None or search_stale and kept["search"].get("family") != FAMILY:
            plan, summary = auto_plan(self.model, search, self.steps, point.sampler, CFG, SEARCH_SEED,
                                      self.search_samples)
            kept = {"spec": search.spec, "plan": plan.to_dict(), "search": summary}
            write_json(path, kept)
        return CachePlan.from_dict(kept["plan"])

    def seed(self, summary: dict) -> int:
        """The state files a front JSON gives back (see the module's docstring); returns how many were missing."""
        files = {self.state / "device.json": {k: summary["meta"][k] for k in ("device_name", "torch")}}
        files.update({self.state / "plans" / f"{stem}.json": plan for stem, plan in summary["searches"].items()})
        files.update({self.state / "reference" / f"{stem}.json": {"fd": fd}
                      for stem, fd in summary["meta"]["reference_fd"].items()})
        files.update({self.state / "speed" / f"{chunk['chunk']}.json": chunk
                      for chunk in summary["meta"]["speed_reference_chunks"]})
        files.update({self.row_path("screen" if row["path"] == "pytorch" else MEASURED[row["path"]], row["sampler"],
                                    row["precision"], CachePlan.from_dict(row["plan"])): row
                      for row in summary["rows"]})
        written = seed_state(files)
        self.ran_on = ran_on(self.state, self.device)
        return written

    def searches(self) -> dict[str, dict]:
        """The state's plan files by stem: the searched plans and their searches, for the summary."""
        return {path.stem: json.loads(path.read_text()) for path in sorted((self.state / "plans").glob("*.json"))}

    def plan_path(self, point: Point) -> Path:
        return self.state / "plans" / f"{point.sampler}-{point.fraction:g}-f{point.forecast}.json"

    def has_plan(self, point: Point) -> bool:
        return point.method in ("none", "interval") or self.plan_path(point).exists()

    @staticmethod
    def plan_key(plan: CachePlan) -> str:
        return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def recipe(self, point: Point, plan: CachePlan) -> Path:
        """The TAP + VC recipe of a quantized point, calibrated on its plan (the pool's samples dropped after)."""
        folder = self.state / "recipes" / f"{point.sampler}-{point.precision}-{self.plan_key(plan)}"
        if not (folder / "recipe.json").exists():
            c = self.calibration
            settings = CalibrationSettings(preset=point.precision, selector="tap", budget=c["budget"], plan=plan,
                                           pool_samples=c["pool_samples"], steps=self.steps, sampler=point.sampler,
                                           cfg_scale=CFG, seed=SEED, vc="var", vc_samples=c["vc_samples"],
                                           batch_size=c["batch_size"])
            calibrate(self.model, folder, settings)
            (folder / "pool.npz").unlink(missing_ok=True)  # tens of MB; the recipe, amax and VC table remain
        return folder

    # --- the float32 reference -------------------------------------------------------------------------------------
    def reference(self, sampler: str, n: int) -> np.ndarray:
        """The float32 PyTorch model's images at the front's seeds (labels i % classes)."""
        path = self.state / "reference" / f"{sampler}-{n}.npy"
        if not path.exists():
            images, _ = generate_images(self.model, n, self.steps, sampler, CachePlan.none(), CFG, SEED, 2000)
            np.save(path, images)
        return np.load(path)

    def reference_fd(self, sampler: str, n: int) -> float:
        path = self.state / "reference" / f"{sampler}-{n}.json"
        if not path.exists():
            images = self.reference(sampler, n)
            labels = np.arange(n) % self.model.config.num_classes
            write_json(path, score(images, labels, fd_resamples=200))
        return json.loads(path.read_text())["fd"]

    # --- screen ---------------------------------------------------------------------------------------------------
    def row_path(self, phase: str, sampler: str, precision: str, plan: CachePlan) -> Path:
        """A screened or measured row's file: points whose plans are the same share it."""
        return self.state / phase / f"{sampler}-{precision}-{self.plan_key(plan)}.json"

    def screen_path(self, point: Point, plan: CachePlan) -> Path:
        return self.row_path("screen", point.sampler, point.precision, plan)

    def screen(self, point: Point, n: int) -> dict:
        """The point's screened row (shared by points whose plans are the same)."""
        plan = self.plan(point)
        return self.screen_plan(point, plan, self.screen_path(point, plan), n)

    def screen_plan(self, point: Point, plan: CachePlan, path: Path, n: int) -> dict:
        """`plan` screened at the point's sampler and precision, kept in `path`."""
        if not path.exists():
            start = time.time()
            model, correction = self.model, None
            if point.precision != "bf16":
                folder = self.recipe(point, plan)
                model, _ = apply_recipe(load_checkpoint(REFERENCE_CHECKPOINT).to(self.device).eval(), folder)
                correction = VarianceCompensation(load_vc(folder))
            with torch.autocast(self.device.type, torch.bfloat16, enabled=point.precision == "bf16"):
                images, labels = generate_images(model, n, self.steps, point.sampler, plan, CFG, SEED, n, correction)
            result = score(images, labels, self.reference(point.sampler, n))
            write_json(path, {**self.row_fields(point, plan, result, n, "pytorch"), "seconds": time.time() - start})
        return json.loads(path.read_text())

    def row_fields(self, point: Point, plan: CachePlan, result: dict, n: int, path: str) -> dict:
        fp = self.reference_fd(point.sampler, n)
        return {"method": point.method, "sampler": point.sampler, "target_fraction": point.fraction,
                "compute_fraction": plan.compute_fraction(self.steps, self.flops), "precision": point.precision,
                "plan": plan.to_dict(), "forecast": plan.forecast, "n": n, "path": path, "fd": result["fd"],
                "fd_ci": result.get("fd_ci"), "fd_ratio_vs_fp": result["fd"] / fp,
                "class_accuracy": result["class_accuracy"], "psnr": result["psnr"], "ssim": result["ssim"]}

    # --- measure --------------------------------------------------------------------------------------------------
    def fp8_variant(self, point: Point) -> str:
        """The FP8 kernels of the point's engines: --fp8-kernels for its FP8 points, "promoting" for the others."""
        return self.fp8_kernels if point.precision == "w8a8-fp8" else "promoting"

    def engine_path(self, point: Point) -> str:
        """A measured row's `path`: the FP8 variants' rows are kept apart."""
        variant = self.fp8_variant(point)
        return "inductor-engines" if variant == "promoting" else f"inductor-engines-{variant}"

    def engines(self, point: Point, plan: CachePlan, batch: int) -> Path:
        from qandc.engines import build_inductor

        # by their build options: fused and fused-cublaslt run the same engines (the MLP's kernel is chosen at run)
        options = FP8_KERNELS[self.fp8_variant(point)]
        folder = (self.work / "engines"
                  / f"{point.sampler}-{point.precision}-{self.plan_key(plan)}{fp8_suffix(options)}")
        if not (folder / "manifest.json").exists():
            recipe = self.recipe(point, plan) if point.precision != "bf16" else None
            build_inductor(self.model, folder, plan=plan, recipe_dir=recipe,
                           sampler=SamplerDefaults(self.steps, point.sampler, CFG), batch_sizes=[2 * batch],
                           **options)
        return folder

    def run_engines(self, point: Point, n: int, batch: int, timed_batches: int | None = None):
        """(uint8 images of n samples or None, images/s over the batches after the first). `timed_batches`: speed
        only, that many batches after the warm-up."""
        from qandc.runtime import Pipeline

        plan = self.plan(point)
        pipeline = Pipeline.load(self.engines(point, plan, batch))
        labels = torch.arange(n) % self.model.config.num_classes
        starts = list(range(0, n, batch))[:None if timed_batches is None else timed_batches + 1]
        images, seconds = [], []
        for start in starts:
            ids = range(start, start + batch)
            begin = time.perf_counter()
            out = pipeline.generate(labels[ids.start:ids.stop], SEED, sample_ids=ids)
            if out.is_cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - begin)
            if timed_batches is None:
                images.append(to_uint8(model_to_images(out, self.model.config))[..., 0])
        if self.fp8_variant(point) == "fused-cublaslt" and cublaslt_fp8.FAILURE:  # the Triton kernel ran instead
            raise QandcError(f"cuBLASLt cannot run the fused MLP here: {cublaslt_fp8.FAILURE}")
        speed = batch * (len(seconds) - 1) / sum(seconds[1:])
        return (np.concatenate(images) if images else None), speed, pipeline.last_run

    def measure_path(self, point: Point) -> Path:
        return self.row_path(MEASURED[self.engine_path(point)], point.sampler, point.precision, self.plan(point))

    def measure(self, point: Point, n: int, batch: int, chunk: dict | None) -> dict:
        plan, path = self.plan(point), self.measure_path(point)
        if not path.exists():
            start = time.time()
            images, speed, last_run = self.run_engines(point, n, batch)
            labels = np.arange(n) % self.model.config.num_classes
            result = score(images, labels, self.reference(point.sampler, n), fd_resamples=200)
            write_json(path, {**self.row_fields(point, plan, result, n, self.engine_path(point)), "images_per_s": speed,
                              "speedup_vs_bf16_compiled": speed / chunk["images_per_s"][point.sampler],
                              "chunk": chunk["chunk"],
                              "engine_steps": last_run["graphs"], "seconds": time.time() - start})
        return json.loads(path.read_text())

    def chunk_reference(self, batch: int, timed_batches: int = 4) -> dict:
        """This command's images/s of the bf16 no-cache engines, per sampler."""
        speeds = {sampler: self.run_engines(Point(sampler, "none", 1.0, 0, "bf16"), batch * (timed_batches + 1),
                                            batch, timed_batches)[1] for sampler in SAMPLERS}
        chunk = {"chunk": time.strftime("%Y%m%dT%H%M%S"), "images_per_s": speeds, "batch": batch,
                 "device_name": device_name(self.device)}
        write_json(self.state / "speed" / f"{chunk['chunk']}.json", chunk)
        return chunk


def best_orders(front: Front, sampler: str):
    """Forecast orders of searched+forecast per fraction: both in bf16; for quantized points the better in bf16."""
    def orders(fraction: float) -> tuple[int, ...]:
        rows = {}
        for k in (1, 2):
            point = Point(sampler, "searched+forecast", fraction, k, "bf16")
            path = front.has_plan(point) and front.screen_path(point, front.plan(point))
            if path and path.exists():
                rows[k] = json.loads(path.read_text())["fd"]
        return (min(rows, key=rows.get),) if len(rows) == 2 else (1, 2)
    return orders


def screen_grid(front: Front, samplers=SAMPLERS, precisions=PRECISIONS):
    """Every point in screening order, bf16 first: its results pick the quantized points' forecast order, so a
    precision's points are listed once the points before them have been screened (a generator)."""
    for precision in precisions:
        for sampler in samplers:
            yield from points(sampler, precision, (lambda f: (1, 2)) if precision == "bf16" else
                              best_orders(front, sampler))


def measure_list(front: Front, screen_rows: dict[Point, dict]) -> list[Point]:
    """Per sampler and precision: the cheapest screened point within each quality target, then no cache (the
    bf16 no-cache engines first: every chunk times them as its reference)."""
    chosen = [Point(sampler, "none", 1.0, 0, "bf16") for sampler in SAMPLERS]
    for target in QUALITY_TARGETS:
        for sampler in SAMPLERS:
            for precision in PRECISIONS:
                within = [(row["compute_fraction"], row["fd"], point) for point, row in screen_rows.items()
                          if point.sampler == sampler and point.precision == precision
                          and row["fd_ratio_vs_fp"] <= target]
                if within:
                    chosen.append(min(within, key=lambda r: r[:2])[2])
    chosen += [Point(s, "none", 1.0, 0, p) for p in PRECISIONS for s in SAMPLERS]
    unique, seen = [], set()
    for point in chosen:
        key = (point.sampler, point.precision, front.plan_key(front.plan(point)))
        if key not in seen:
            seen.add(key)
            unique.append(point)
    return unique


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both images/s and FD."""
    return [r for r in rows if not any(o["images_per_s"] >= r["images_per_s"] and o["fd"] <= r["fd"] and
                                       (o["images_per_s"], o["fd"]) != (r["images_per_s"], r["fd"]) for o in rows)]


def targets(rows: list[dict], peers: list[dict]) -> dict:
    """The issue's targets, read from the measured rows and the peers."""
    measured = [r for r in rows if r["path"] == "inductor-engines"]
    result = {}
    within = [r for r in measured if r["fd_ratio_vs_fp"] <= 1.10]
    if within:
        best = max(within, key=lambda r: r["images_per_s"])
        result["fastest_within_1.10"] = {k: best[k] for k in ("sampler", "precision", "method", "compute_fraction",
                                                              "forecast", "fd_ratio_vs_fp", "fd_ci",
                                                              "speedup_vs_bf16_compiled")}
        result["speedup_target_3x_met"] = best["speedup_vs_bf16_compiled"] >= 3
    tight = [r for r in measured if r.get("fd_ci") and r["fd_ci"][1] * r["fd_ratio_vs_fp"] / r["fd"] <= 1.05]
    if tight:  # the moonshot: the upper end of the FD interval within 1.05x of full precision's FD
        best = max(tight, key=lambda r: r["images_per_s"])
        result["fastest_ci_within_1.05"] = {k: best[k] for k in ("sampler", "precision", "method", "compute_fraction",
                                                                 "speedup_vs_bf16_compiled")}
        result["moonshot_4x_met"] = best["speedup_vs_bf16_compiled"] >= 4
    comparisons = []
    for sampler in SAMPLERS:
        for fraction in FRACTIONS[1:]:
            near = [p for p in peers if p["sampler"] == sampler and p.get("fd") is not None
                    and abs(p["compute_fraction"] - fraction) <= TOLERANCE]
            if not near:
                continue
            peer = min(near, key=lambda p: p["fd"])
            screened = [r for r in rows if r["path"] == "pytorch" and r["sampler"] == sampler and r["n"] == peer["n"]
                        and r["compute_fraction"] <= fraction + TOLERANCE]
            comparison = {"sampler": sampler, "fraction": fraction, "best_peer": peer["method"],
                          "peer_compute_fraction": peer["compute_fraction"], "peer_fd": peer["fd"]}
            for key, ours in (("", [r for r in screened if r["compute_fraction"] >= fraction - TOLERANCE]),
                              ("_within_budget", screened)):
                best = min(ours, key=lambda r: r["fd"], default=None)
                comparison.update({f"qandc_best{key}": best and f"{best['method']} {best['precision']} at "
                                                             f"{best['compute_fraction']:.2f}",
                                   f"qandc_best_fd{key}": best and best["fd"],
                                   f"qandc_wins{key}": best is not None and best["fd"] <= peer["fd"]})
            comparisons.append(comparison)
    result["vs_peers"] = comparisons
    def point_key(row: dict) -> tuple[str, str]:
        return row["sampler"], Front.plan_key(CachePlan.from_dict(row["plan"]))

    promoted = {point_key(r): r for r in measured if r["precision"] == "w8a8-fp8"}
    # the FP8 variants' engines against the same points' promoting engines (same seeds)
    variants = {path.removeprefix("inductor-engines-"): [(r, promoted.get(point_key(r))) for r in rows
                                                         if r["path"] == path]
                for path in MEASURED if path != "inductor-engines"}
    result["fp8_kernels"] = {
        variant: [{"sampler": r["sampler"], "method": r["method"], "compute_fraction": r["compute_fraction"],
                   "fd_ratio_vs_fp": r["fd_ratio_vs_fp"], "fd_ci": r["fd_ci"],
                   "fd_ratio_vs_promoting": p and r["fd"] / p["fd"],
                   "speedup_vs_promoting": p and r["speedup_vs_bf16_compiled"] / p["speedup_vs_bf16_compiled"]}
                  for r, p in pairs]
        for variant, pairs in variants.items() if pairs}
    # the reading: at each fraction of the grid, qandc's best within ±TOLERANCE against the best peer's; and
    # a user's, with a budget of that fraction: qandc's best at that fraction or below (a cheaper point counts)
    for key in ("", "_within_budget"):
        result[f"beats_every_peer_at_every_fraction{key}"] = bool(comparisons) and all(
            c[f"qandc_wins{key}"] for c in comparisons)
    return result


def plot(rows: list[dict], peers: list[dict], path: Path, card: str, steps: int) -> None:
    """Top: images/s against FD / fp of the measured (engine) points, per sampler. Bottom: FD / fp against compute
    fraction of the screened points (best method per precision) and the peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"bf16": "tab:blue", "w8a8-fp8": "tab:red", "w8a8-int8": "tab:green"}
    markers = {"none": "s", "interval": "o", "searched": "^", "searched+forecast": "*"}
    fig, axes = plt.subplots(2, len(SAMPLERS), figsize=(7 * len(SAMPLERS), 10), squeeze=False)
    for column, sampler in enumerate(SAMPLERS):
        top, bottom = axes[0][column], axes[1][column]
        measured = [r for r in rows if r["path"] == "inductor-engines" and r["sampler"] == sampler]
        for r in measured:
            top.scatter(r["images_per_s"], r["fd_ratio_vs_fp"], color=colors[r["precision"]],
                        marker=markers[r["method"]], s=60)
            if r.get("fd_ci"):
                fp = r["fd"] / r["fd_ratio_vs_fp"]
                top.vlines(r["images_per_s"], r["fd_ci"][0] / fp, r["fd_ci"][1] / fp, color=colors[r["precision"]])
            top.annotate(f"{r['compute_fraction']:.2f}", (r["images_per_s"], r["fd_ratio_vs_fp"]), fontsize=7,
                         xytext=(4, 4), textcoords="offset points")
        line = sorted(pareto(measured), key=lambda r: r["images_per_s"])
        top.plot([r["images_per_s"] for r in line], [r["fd_ratio_vs_fp"] for r in line], color="grey", lw=0.8)
        for target in QUALITY_TARGETS:
            top.axhline(target, ls=":", color="grey")
        if measured:
            top.set_xscale("log")
        else:
            top.text(0.5, 0.5, "not measured on the engines yet", ha="center", transform=top.transAxes)
        top.set(xlabel="images / s (Inductor engines, CUDA graphs)", ylabel="FD / float32 FD",
                title=f"{sampler.upper()}-{steps}, CFG {CFG}: measured front ({card}; label: compute fraction)")
        screened = [r for r in rows if r["path"] == "pytorch" and r["sampler"] == sampler]
        for precision in PRECISIONS:
            best = {}
            for r in screened:
                if r["precision"] == precision:
                    key = round(r["compute_fraction"], 2)
                    best[key] = min(best.get(key, r), r, key=lambda x: x["fd"])
            xs = sorted(best)
            bottom.plot(xs, [best[x]["fd_ratio_vs_fp"] for x in xs], marker="o", color=colors[precision],
                        label=f"qandc {precision} (best method)")
        for peer in (p for p in peers if p["sampler"] == sampler and p.get("fd") is not None):
            bottom.scatter(peer["compute_fraction"], peer["fd_ratio_vs_fp"], marker="x", color="black")
            bottom.annotate(peer["method"], (peer["compute_fraction"], peer["fd_ratio_vs_fp"]), fontsize=6,
                            xytext=(3, -8), textcoords="offset points")
        bottom.set(yscale="log", xlabel="compute fraction", ylabel="FD / float32 FD (screen, PyTorch path)",
                   title=f"{sampler.upper()}-{steps}: qandc vs diffusers cache hooks (x), same seeds")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_summary(front: Front, args, rows: list[dict]) -> None:
    """front-<card>.json and .png from the rows at hand (one per point: points whose plans agree share numbers), for
    the card the state's rows ran on."""
    state = front.state
    card = card_name(front.ran_on["device_name"])
    peers_path = Path(args.peers) if args.peers else ROOT / "benchmarks" / "results" / f"front-peers-{card}.json"
    peers = json.loads(peers_path.read_text())["peers"] if peers_path.exists() else []
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"front-{card}.json"
    meta = {"card": card, "device_name": front.ran_on["device_name"], "torch": front.ran_on["torch"],
            "steps": front.steps, "cfg_scale": CFG, "seed": SEED,
            "search_seed": SEARCH_SEED, "search_samples": args.search_samples,
            "calibration": {"selector": "tap", "budget": args.budget, "pool_samples": args.pool_samples,
                            "vc": "var", "vc_samples": args.vc_samples},
            "screen_n": args.screen_n, "measure_n": args.measure_n, "batch_images": args.batch,
            "reference_fd": {p.stem: json.loads(p.read_text())["fd"]
                             for p in sorted((state / "reference").glob("*.json"))},
            "speed_reference_chunks": [json.loads(p.read_text()) for p in sorted((state / "speed").glob("*.json"))],
            "matmul": "float32 PyTorch paths with TF32", "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT),
            "peers_source": peers_path.resolve().relative_to(ROOT).as_posix() if peers_path.exists() else None}
    result = {"meta": meta, "rows": rows, "peers": peers, "targets": targets(rows, peers),
              "searches": front.searches()}
    write_json(out, result)
    plot(rows, peers, out.with_suffix(".png"), meta["device_name"], front.steps)
    print(json.dumps(result["targets"], indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screen-n", type=int, default=2000)
    parser.add_argument("--measure-n", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=250, help="images a batch on the engines (twice the rows)")
    parser.add_argument("--search-samples", type=int, default=8, help="trajectories a plan search measures")
    parser.add_argument("--budget", type=int, default=800, help="calibration samples TAP selects")
    parser.add_argument("--pool-samples", type=int, default=256)
    parser.add_argument("--vc-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=STEPS, help="sampling steps (the grid's intervals assume 50)")
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS),
                        help="bf16 first (it picks forecast orders)")
    parser.add_argument("--phases", nargs="*", default=["screen", "measure", "summary"])
    parser.add_argument("--fp8-kernels", choices=list(FP8_KERNELS), default="promoting",
                        help="the W8A8-FP8 engines measured: FP8 GEMMs promoting their running sum to float32, "
                             "without that promotion (fastaccum), or issue 17's fastest step (fused: Triton MLP and "
                             "norm kernels, fast accumulation; fused-cublaslt: cuBLASLt's GELU epilogue for the "
                             "MLPs, with nvmath-python); other than promoting, rows are kept apart, out of the front "
                             "(fp8_kernels)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop between points after this many seconds")
    parser.add_argument("--state", default="/tmp/qandc-front")
    parser.add_argument("--work", default="/tmp/qandc-front-work", help="engines and Inductor's compile cache")
    parser.add_argument("--peers", help="benchmarks/front_peers.py's JSON (default: front-peers-<card>.json)")
    parser.add_argument("--out", help="default benchmarks/results/front-<card>.json")
    parser.add_argument("--seed-from", help="a front JSON whose rows, plans and searches a new state starts from")
    args = parser.parse_args()
    if args.measure_n % args.batch:
        parser.error(f"--measure-n ({args.measure_n}) must be a multiple of --batch ({args.batch})")
    begin = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cublaslt_fp8.ENABLED = args.fp8_kernels == "fused-cublaslt"
    if cublaslt_fp8.ENABLED and not cublaslt_fp8.usable_on(device):
        parser.error("--fp8-kernels fused-cublaslt needs nvmath-python and a GPU of compute capability 8.9 or later")
    torch.backends.cuda.matmul.allow_tf32 = True
    state, work = Path(args.state), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    front = Front(state, work, device, args.search_samples,
                  {"budget": args.budget, "pool_samples": args.pool_samples, "vc_samples": args.vc_samples,
                   "batch_size": 512}, args.steps, args.fp8_kernels)
    if args.seed_from:
        print(f"{front.seed(json.loads(Path(args.seed_from).read_text()))} state files from {args.seed_from}")

    announced = []

    def spent() -> bool:
        if time.perf_counter() - begin <= args.budget_s:
            return False
        if not announced:
            announced.append(print(f"budget of {args.budget_s:.0f} s spent: rerun to resume", flush=True))
        return True

    screen_rows = {}
    for point in screen_grid(front, args.samplers, args.precisions):
        if not front.has_plan(point) and ("screen" not in args.phases or spent()):
            continue
        path = front.screen_path(point, front.plan(point, search_stale="screen" in args.phases and not spent()))
        if path.exists() or ("screen" in args.phases and not spent()):
            screen_rows[point] = {**front.screen(point, args.screen_n), "method": point.method,
                                  "target_fraction": point.fraction}
            r = screen_rows[point]
            print(f"screen {point.name}: fraction {r['compute_fraction']:.3f} FD {r['fd']:.3f} "
                  f"({r['fd_ratio_vs_fp']:.2f}x)", flush=True)
    measured_rows, chunk = {}, None
    for point in measure_list(front, screen_rows):  # measured points kept in the state count in every phase
        if not front.measure_path(point).exists():
            if "measure" not in args.phases or spent():
                continue
            chunk = chunk or front.chunk_reference(args.batch)
        measured_rows[point] = r = {**front.measure(point, args.measure_n, args.batch, chunk), "method": point.method,
                                    "target_fraction": point.fraction}
        if "measure" in args.phases:
            print(f"measure {point.name}: {r['images_per_s']:.0f} images/s ({r['speedup_vs_bf16_compiled']:.2f}x) "
                  f"FD {r['fd']:.3f} ({r['fd_ratio_vs_fp']:.2f}x)", flush=True)
    picked = {front.measure_path(point) for point in measured_rows}
    earlier = [json.loads(p.read_text()) for folder in MEASURED.values()
               for p in sorted((state / folder).glob("*.json")) if p not in picked]
    if "summary" in args.phases:
        write_summary(front, args, [*screen_rows.values(), *measured_rows.values(), *earlier])


if __name__ == "__main__":
    main()
