"""Peers on the same model and seeds (issue 15): diffusers' cache hooks on the shipped Fashion-MNIST reference DiT,
converted to a diffusers `DiTTransformer2DModel` and driven by qandc's sampler, at compute fractions 0.5 / 0.4 /
0.33 / 0.25 (±0.03), DDPM-50 and DDIM-50, CFG 1.5 — the `peers` of the front (benchmarks/front.py).

Every row samples n images (labels i % 10, sample i keyed by (seed, i), one batch of `--batch-size` rows: the hooks
decide per batch, so every method runs the same batch) and scores them: FD against the classifier's test-set
statistics, fd_ratio_vs_fp against the float32 qandc model's FD at the same sampler, seeds and n (its row is
computed here too), PSNR / SSIM against its images. The compute fraction is measured while sampling
(`qandc.peers.BranchCounter`: the branch FLOPs that ran over those of the uncached run), never assumed.

Each hook does its best at each fraction: its knobs are tuned on `--tune-n` other trajectories (seed + 1000, one
batch) by the error qandc's own plan search minimises (`sample_error`: the geometric mean over samples of
Σ (x − x₀)² / Σ x₀² against the uncached run, same noise). Knobs that only schedule (TaylorSeer, FasterCache, PAB;
MagCache once calibrated) give a compute fraction that follows from the settings alone: it is probed on one
trajectory, and the candidates within the target are sampled for their error. Threshold knobs (FirstBlockCache,
MagCache, SeaCache) are bisected to the target fraction, for each family of the other knobs (on the tuning batch
where the decision depends on the data). A method that cannot reach a target records why (`failure`, with the
lowest fraction it reached); one that reaches none of them also gets a row at its own lowest fraction ("floor").
A `none` row runs the converted model without hooks (compute fraction 1: the conversion, sample for sample).

Run on a GPU: resumable (each finished row is a JSON file in --state; --budget-s stops between rows; --seed-from
front-peers-<card>.json starts a new state from the rows a committed JSON holds, the GPU machine keeping nothing
between sessions); writes benchmarks/results/front-peers-<card>.json ({"meta", "peers"}) and the .md table beside
it. On a CPU, check it end to end with e.g. `--n 130 --steps 10 --tune-n 4 --methods none FirstBlockCache
--targets 0.5` (FD needs n > 128).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import generate_images, ran_on, seed_state, table
from qandc.artifacts import atomic_path, sha256_file, write_json
from qandc.bench import card_name
from qandc.calibration.plan_search import sample_error
from qandc.errors import QandcError
from qandc.metrics.evaluate import score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.model.graphs import sample_inputs
from qandc.peers import PEERS, BranchCounter, calibrate_magcache, peer_denoiser
from qandc.sampling import sample

TARGETS = (0.5, 0.4, 0.33, 0.25)
TOLERANCE = 0.03
CHOICE_TOLERANCE = 0.02  # candidates picked within this of the target, so a run on other samples stays within ±0.03
MAX_EVALS = 6            # candidates sampled for their error, per row
MAX_FAMILIES = 4         # threshold families bisected on the tuning batch (each bisection samples it ~6 times)
BISECTIONS = 8
NEVER = 1e9              # a threshold no change reaches: the hook skips all it may (its lowest fraction)
CONVERSION_TOLERANCE = 1e-5
SETTINGS = ("n", "batch_size", "steps", "cfg_scale", "seed", "tune_n")  # a state folder holds rows of one setting


@dataclass(frozen=True)
class Search:
    """How a hook's knobs are tuned: `grid(steps)` lists the settings of its other knobs, in order of preference;
    `threshold` names the knob bisected to the target fraction (from `start`); `scheduled`: the compute fraction
    follows from the settings and step count alone (probed on one trajectory), else it depends on the data;
    `unscheduled` lists knobs that leave the fraction unchanged (probed once for all their values)."""

    grid: Callable[[int], list[dict]]
    threshold: str | None = None
    start: float = 0.1
    scheduled: bool = True
    unscheduled: tuple[str, ...] = ()


SEARCHES = {
    "TaylorSeerCache": Search(lambda steps: [
        dict(cache_interval=n, disable_cache_before_step=b, max_order=order)
        for n in range(2, 9) for b in (1, 2, 3, 4, 6, 8, 10, 12, 16) if b < steps for order in (1, 2)],
        unscheduled=("max_order",)),
    "FirstBlockCache": Search(lambda steps: [{}], threshold="threshold", start=0.05, scheduled=False),
    "MagCache": Search(lambda steps: [dict(max_skip_steps=k, retention_ratio=r) for k in (2, 3, 4, 6)
                                      for r in (0.1, 0.2)], threshold="threshold", start=0.06),
    "SeaCache": Search(lambda steps: [dict(residual_order=order, max_consecutive_cached=k) for k in (2, 3, 4, 6)
                                      for order in (1, 0)], threshold="threshold", start=0.25, scheduled=False),
    "FasterCache": Search(lambda steps: [
        dict(unconditional_batch_skip_range=u, unconditional_batch_timestep_skip_range=[-1, ut],
             spatial_attention_block_skip_range=a, spatial_attention_timestep_skip_range=[-1, at],
             attention_weight=0.5)
        for u in (2, 3, 5, 50) for ut in (641, 1000) for a in (2, 3, 4, 6) for at in (681, 1000)]),
    "PyramidAttentionBroadcast": Search(lambda steps: [
        dict(spatial_attention_block_skip_range=a, spatial_attention_timestep_skip_range=r)
        for a in (2, 3, 4, 6, 8, 12, 25) for r in ([100, 800], [-1, 1000])]),
}


def settings_key(method: str, sampler: str, settings: dict) -> str:
    """A probe's key (MagCache's ratios left out: one set per sampler and state folder)."""
    return f"{method}|{sampler}|{json.dumps(brief(settings), sort_keys=True)}"


class Tuner:
    """Tunes a hook's knobs for one sampler on the tuning trajectories; probes are kept in `probes` (a JSON file
    in the state folder, so a resumed run does not probe again)."""

    def __init__(self, model, sampler: str, args, state: Path):
        self.model, self.sampler, self.args = model, sampler, args
        self.labels = torch.arange(args.tune_n) % model.config.num_classes
        self.seed = args.seed + 1000
        self.probes_file, self.ratios_file = state / f"probes-{sampler}.json", state / f"magcache-{sampler}.json"
        self.probes = json.loads(self.probes_file.read_text()) if self.probes_file.exists() else {}
        self._reference = None

    def run(self, method: str, settings: dict, labels) -> tuple[float | None, float]:
        """(error of a run of `labels` against the uncached one, or None for a probe (labels None: one
        trajectory); its compute fraction)."""
        denoiser = peer_denoiser(self.model, self.args.steps, method, settings)
        counter = BranchCounter(denoiser.transformer, self.model.config)
        a = self.args
        if labels is None:
            sample(denoiser, self.labels[:1], a.steps, self.sampler, a.cfg_scale, seed=self.seed)
            return None, counter.fraction
        error = sample_error(denoiser, None, labels, a.steps, self.sampler, a.cfg_scale, self.seed, self.reference)
        return error, counter.fraction

    @property
    def reference(self) -> torch.Tensor:
        if self._reference is None:
            self._reference = sample(peer_denoiser(self.model, self.args.steps), self.labels, self.args.steps,
                                     self.sampler, self.args.cfg_scale, seed=self.seed)
        return self._reference

    @property
    def mag_ratios(self) -> list[float]:
        """MagCache's ratios, calibrated on the tuning batch (kept)."""
        if not self.ratios_file.exists():
            ratios = calibrate_magcache(self.model, self.labels, self.args.steps, self.sampler, self.args.cfg_scale,
                                        self.seed)
            write_json(self.ratios_file, {"mag_ratios": ratios})
        return json.loads(self.ratios_file.read_text())["mag_ratios"]

    def probe(self, method: str, settings: dict, search: Search) -> float:
        """The compute fraction of settings that fix it whatever the data (one trajectory; kept)."""
        key = settings_key(method, self.sampler, {k: v for k, v in settings.items() if k not in search.unscheduled})
        if key not in self.probes:
            self.probes[key] = self.run(method, settings, None)[1]
            write_json(self.probes_file, self.probes)
        return self.probes[key]

    def evaluate(self, method: str, settings: dict) -> dict:
        error, fraction = self.run(method, settings, self.labels)
        error = error if math.isfinite(error) else math.inf
        return {"settings": settings, "compute_fraction": fraction, "error": error}

    def families(self, method: str) -> list[dict]:
        grid = SEARCHES[method].grid(self.args.steps)
        return [{**s, "mag_ratios": self.mag_ratios} for s in grid] if method == "MagCache" else grid

    def tune(self, method: str, target: float) -> dict:
        """{"chosen": settings or None, its tuning error and fraction, the candidates sampled, and the lowest
        fraction seen (with its settings)}."""
        search = SEARCHES[method]
        seen = []      # (fraction, settings) of every probe and evaluation
        records = []   # evaluated candidates: {settings, compute_fraction, error}
        pending = []   # (distance to the target, settings) of scheduled candidates to evaluate
        if search.threshold is None:
            for settings in self.families(method):
                fraction = self.probe(method, settings, search)
                seen.append((fraction, settings))
                if abs(fraction - target) <= CHOICE_TOLERANCE:
                    pending.append((abs(fraction - target), settings))
        else:
            bisected = 0
            for family in self.families(method):
                if not search.scheduled and bisected == MAX_FAMILIES:
                    break
                floor = {**family, search.threshold: NEVER}
                seen.append((self.probe(method, floor, search), floor))
                if seen[-1][0] > target + CHOICE_TOLERANCE:
                    continue
                bisected += 1
                tried = self.bisect(method, family, target, search)
                seen += [(r["compute_fraction"], r["settings"]) for r in tried]
                near = [r for r in tried if abs(r["compute_fraction"] - target) <= CHOICE_TOLERANCE]
                if not search.scheduled:
                    records += near
                elif near:
                    closest = min(near, key=lambda r: abs(r["compute_fraction"] - target))
                    pending.append((abs(closest["compute_fraction"] - target), closest["settings"]))
        pending.sort(key=lambda p: p[0])
        records += [self.evaluate(method, settings) for _, settings in pending[:MAX_EVALS]]
        records = [r for r in records if abs(r["compute_fraction"] - target) <= TOLERANCE]
        chosen = min(records, key=lambda r: r["error"]) if records else None
        lowest_fraction, lowest = min(seen, key=lambda s: s[0])
        return {"chosen": chosen["settings"] if chosen else None, "tune_error": chosen["error"] if chosen else None,
                "tune_fraction": chosen["compute_fraction"] if chosen else None,
                "candidates": [{**r, "settings": brief(r["settings"])} for r in records],
                "lowest": {"compute_fraction": lowest_fraction, "settings": brief(lowest)}}

    def bisect(self, method: str, family: dict, target: float, search: Search) -> list[dict]:
        """Records ({settings, compute_fraction[, error]}) of a bisection of the threshold knob to `target` (the
        fraction falls as the threshold rises): geometric steps, from `start` out by 4x until bracketed."""
        records, low, high, threshold = [], 0.0, None, search.start
        for _ in range(BISECTIONS):
            settings = {**family, search.threshold: threshold}
            if search.scheduled:
                record = {"settings": settings, "compute_fraction": self.probe(method, settings, search)}
            else:
                record = self.evaluate(method, settings)
            records.append(record)
            fraction = record["compute_fraction"]
            if abs(fraction - target) <= CHOICE_TOLERANCE / 2:
                break
            if fraction > target:
                low = threshold
            else:
                high = threshold
            threshold = threshold * 4 if high is None else high / 4 if low == 0 else math.sqrt(low * high)
        return records


def brief(settings: dict | None) -> dict | None:
    """Settings for the record, MagCache's calibrated ratios left out (they are in the row's `calibration`)."""
    return None if settings is None else {k: v for k, v in settings.items() if k != "mag_ratios"}


def check_conversion(model) -> float:
    """The converted module's relative error against qandc's forward (float32) on example inputs with the null
    class; fails loudly above CONVERSION_TOLERANCE."""
    denoiser = peer_denoiser(model, 1)
    x, t, y = sample_inputs(model, batch=12)
    with torch.no_grad():
        expected = model(x, t, y).double()
        got = denoiser.transformer(hidden_states=x, timestep=t, class_labels=y).sample.double()
    error = float((got - expected).norm() / expected.norm())
    if not error <= CONVERSION_TOLERANCE:
        raise QandcError(f"the diffusers conversion does not match qandc's forward: relative error {error:.2e} "
                         f"(limit {CONVERSION_TOLERANCE:.0e})")
    return error


def fp_row(model, sampler: str, args, state: Path) -> dict:
    """The float32 qandc model's row (uncached), its images kept in the state folder for PSNR / SSIM (sampled again
    where a seeded state lacks them)."""
    path = state / f"fp-{sampler}.json"
    if path.exists() and (state / f"fp-{sampler}.npy").exists():
        return json.loads(path.read_text())
    start = time.time()
    images, labels = generate_images(model, args.n, args.steps, sampler, None, args.cfg_scale, args.seed,
                                     args.batch_size)
    with atomic_path(state / f"fp-{sampler}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images)
    result = score(images, labels)
    row = {"sampler": sampler, "n": result["n"], "fd": result["fd"], "class_accuracy": result["class_accuracy"],
           "seconds": time.time() - start}
    write_json(path, row)
    return row


def measure(model, method: str, settings: dict | None, sampler: str, args, state: Path) -> dict:
    """Sample and score the row's n images under the hook; the compute fraction as measured."""
    start = time.time()
    denoiser = peer_denoiser(model, args.steps, None if method == "none" else method, settings)
    counter = BranchCounter(denoiser.transformer, model.config)
    images, labels = generate_images(denoiser, args.n, args.steps, sampler, None, args.cfg_scale, args.seed,
                                     args.batch_size)
    result = score(images, labels, np.load(state / f"fp-{sampler}.npy"))
    return {"compute_fraction": counter.fraction, "n": result["n"], "fd": result["fd"],
            "class_accuracy": result["class_accuracy"], "psnr": result["psnr"], "ssim": result["ssim"],
            "seconds": time.time() - start}


def row_file(state: Path, method: str, sampler: str, target) -> Path:
    return state / "rows" / f"{method}-{sampler}-{target}.json"


def peer_row(model, tuner: Tuner, method: str, sampler: str, target, args, state: Path) -> dict:
    """One row: tune at `target` (a fraction, or "floor": the method's lowest fraction seen in its failed rows),
    then measure; or the reason it cannot reach the target."""
    start = time.time()
    row = {"method": method, "sampler": sampler, "target_fraction": target}
    if method == "none":
        return {**row, "settings": {}, **measure(model, method, {}, sampler, args, state)}
    if target == "floor":
        lowest = min(json.loads(row_file(state, method, sampler, t).read_text())["lowest"]["compute_fraction"]
                     for t in args.targets)
        target_value = round(lowest + CHOICE_TOLERANCE, 2)
        row["target_fraction"] = target_value
    else:
        target_value = target
    tuning = tuner.tune(method, target_value)
    row["tuning"] = {k: tuning[k] for k in ("tune_error", "tune_fraction", "candidates")}
    row["tuning"].update(samples=args.tune_n, seed=tuner.seed, seconds=time.time() - start)
    row["lowest"] = tuning["lowest"]
    if tuning["chosen"] is None:
        lowest = tuning["lowest"]
        return {**row, "settings": None, "compute_fraction": None, "n": 0, "fd": None, "class_accuracy": None,
                "psnr": None, "ssim": None, "seconds": None,
                "failure": f"unreachable: no settings within {target_value}±{TOLERANCE} (lowest compute fraction "
                           f"reached {lowest['compute_fraction']:.3f} with {lowest['settings']})"}
    row["settings"] = brief(tuning["chosen"])
    if method == "MagCache":
        row["calibration"] = {"mag_ratios": tuning["chosen"]["mag_ratios"], "samples": args.tune_n,
                              "seed": tuner.seed}
    row.update(measure(model, method, tuning["chosen"], sampler, args, state))
    if abs(row["compute_fraction"] - target_value) > TOLERANCE:
        row["failure"] = (f"measured compute fraction {row['compute_fraction']:.3f} is outside {target_value}"
                          f"±{TOLERANCE} (the settings were tuned to {tuning['tune_fraction']:.3f} on the tuning "
                          "batch; the hook decides per batch, on its data)")
    return row


def seed(state: Path, summary: dict) -> int:
    """The state files a front-peers JSON gives back: its settings, card, fp rows and peer rows (a row whose target
    is none of the JSON's targets is a method's floor row); returns how many were missing."""
    meta = summary["meta"]
    files = {state / "settings.json": {k: meta[k] for k in SETTINGS},
             state / "device.json": {"device_name": meta["card"], "torch": meta["torch"]}}
    files.update({state / f"fp-{sampler}.json": row for sampler, row in meta["fp"].items()})
    for row in summary["peers"]:
        target = row["target_fraction"]
        if row["method"] != "none" and target not in meta["targets"]:
            target = "floor"
        files[row_file(state, row["method"], row["sampler"], target)] = row
    return seed_state(files)


def markdown(rows: list[dict], meta: dict) -> str:
    title = (f"# diffusers cache hooks on the reference model ({meta['n']} samples a row, {meta['steps']} steps, CFG "
             f"{meta['cfg_scale']}, one batch of {meta['batch_size']}, {meta['card']})")
    header = ["method", "sampler", "target", "compute fraction", "FD", "FD / fp", "class accuracy", "PSNR vs fp (dB)",
              "settings / failure"]
    cells = []
    for r in rows:
        cells.append([r["method"], r["sampler"], str(r["target_fraction"])])
        if r["fd"] is None:
            cells[-1] += ["", "", "", "", "", r["failure"]]
        else:
            cells[-1] += [f"{r['compute_fraction']:.3f}", f"{r['fd']:.3f}", f"{r['fd_ratio_vs_fp']:.2f}",
                          f"{r['class_accuracy']:.4f}", f"{r['psnr']:.2f}",
                          (r.get("failure", "") + " " + json.dumps(r["settings"])).strip()]
    return "\n".join([title, "", *table(header, cells)]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, help="rows of a batch (default n: one batch)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-n", type=int, default=128, help="tuning trajectories (one batch, seed + 1000)")
    parser.add_argument("--samplers", nargs="*", default=["ddpm", "ddim"])
    parser.add_argument("--methods", nargs="*", default=["none", *PEERS], choices=["none", *PEERS])
    parser.add_argument("--targets", nargs="*", type=float, default=list(TARGETS))
    parser.add_argument("--state", default="/tmp/qandc-front-peers")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no row after this many seconds")
    parser.add_argument("--out", help="default benchmarks/results/front-peers-<card>.json")
    parser.add_argument("--seed-from", help="a front-peers JSON whose rows a new state starts from")
    args = parser.parse_args()
    args.batch_size = args.batch_size or args.n
    started = time.time()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside FasterCache
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # FasterCache warns it is experimental at every application
    torch.backends.cuda.matmul.allow_tf32 = True  # as benchmarks/front.py's float32 rows (and twice as fast)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = Path(args.state)
    (state / "rows").mkdir(parents=True, exist_ok=True)
    if args.seed_from:
        print(f"{seed(state, json.loads(Path(args.seed_from).read_text()))} state files from {args.seed_from}")
    measured_on = ran_on(state, device)  # the card the state's rows ran on
    card = card_name(measured_on["device_name"])
    out = args.out or str(Path(__file__).parent / "results" / f"front-peers-{card}.json")
    settings = {k: getattr(args, k) for k in SETTINGS}
    kept = json.loads((state / "settings.json").read_text()) if (state / "settings.json").exists() else settings
    if kept != settings:
        raise QandcError(f"{state}: a state folder of other settings ({json.dumps(kept)}): give another --state")
    write_json(state / "settings.json", settings)
    model = load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
    conversion_error = check_conversion(model)
    print(f"conversion: relative error {conversion_error:.2e} against qandc's forward", flush=True)
    complete = True
    for sampler in args.samplers:
        fp, tuner = None, Tuner(model, sampler, args, state)
        for method in args.methods:
            targets = [1.0] if method == "none" else list(args.targets)
            for target in [*targets, "floor"]:
                path = row_file(state, method, sampler, target)
                if path.exists():
                    continue
                if target == "floor" and (method == "none" or any(
                        not row_file(state, method, sampler, t).exists()
                        or json.loads(row_file(state, method, sampler, t).read_text())["fd"] is not None
                        for t in targets)):
                    continue  # a floor row only for a method that reached none of the targets
                if time.time() - started > args.budget_s:
                    complete = False
                    break
                fp = fp or fp_row(model, sampler, args, state)  # sampled once a row needs it
                row = peer_row(model, tuner, method, sampler, target, args, state)
                row["fd_ratio_vs_fp"] = row["fd"] / fp["fd"] if row["fd"] is not None else None
                write_json(path, row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("tuning", "calibration")}), flush=True)
    rows, fps = [], {}
    for sampler in args.samplers:
        if (state / f"fp-{sampler}.json").exists():
            fps[sampler] = json.loads((state / f"fp-{sampler}.json").read_text())
        for method in args.methods:
            rows += [json.loads(p.read_text()) for p in sorted((state / "rows").glob(f"{method}-{sampler}-*.json"))]
    meta = {"card": measured_on["device_name"], **settings,
            "samplers": args.samplers, "targets": args.targets, "tolerance": TOLERANCE, "fp": fps,
            "complete": complete, "conversion_error": conversion_error, "matmul": "float32 with TF32",
            "torch": measured_on["torch"], "diffusers": __import__("diffusers").__version__,
            "checkpoint_sha256": sha256_file(REFERENCE_CHECKPOINT),
            "tuning": {"seed": args.seed + 1000, "samples": args.tune_n, "error": "sample_error (plan search's)",
                       "choice_tolerance": CHOICE_TOLERANCE, "max_evals": MAX_EVALS,
                       "max_families": MAX_FAMILIES, "bisections": BISECTIONS},
            "notes": ["hooks decide per call: one decision for the whole batch (CFG rows included)",
                      "the cache context (step, timestep, sigma) is set by qandc.peers.DiffusersDenoiser",
                      "TaylorSeerCache: given every block's attn1 and ff (its default patterns match none)",
                      "SeaCache's indicator: the batch's latents, filtered per sample, compared over the batch",
                      "FasterCache: the batch swapped to its [uncond; cond] order around each call, class_labels "
                      "split with the other inputs",
                      "what the hooks do on a DiT with diffusers' defaults: "
                      "benchmarks/peer_failures/defaults_on_dit.py"]}
    write_json(out, {"meta": meta, "peers": rows})
    with atomic_path(Path(out).with_suffix(".md")) as tmp:
        tmp.write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    try:
        main()
    except QandcError as e:
        raise SystemExit(f"error: {e}")
