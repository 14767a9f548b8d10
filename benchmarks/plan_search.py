"""The compute search (`--cache auto:compute=F[,forecast=K]`) against the interval plan at the same compute, on the
reference model: error of the final samples against the uncached ones at the search's own seeds and on held-out
labels and noise.
dB: the samples' mean SNR against the uncached ones (the search's error); pooled: Σ over all samples, which one
sample sent to another image can dominate.

For each sampler and forecast order the family is sampled once up to the largest target (what `auto:compute=F`
does for that F; smaller targets choose among the same measurements, as the search would).
Usage: python benchmarks/plan_search.py [--device cuda] [--steps 50] [--search-samples 4] [--held-out 32]
Writes benchmarks/results/plan-search.json (and .md).
"""

import argparse
import math
import platform
import time

import torch

from _common import table, write_results
from qandc.calibration.plan_search import choose, evaluate_candidates, sample_errors
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.sampling import sample


def decibels(error: float) -> float:
    return -10 * math.log10(error) if error > 0 else math.inf


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
    parser.add_argument("--forecasts", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.26, 0.34, 0.5])
    parser.add_argument("--search-samples", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/plan-search.json")
    args = parser.parse_args()
    model = load_checkpoint(REFERENCE_CHECKPOINT).eval().to(args.device)
    steps, cfg = args.steps, args.cfg_scale
    classes = model.config.num_classes
    search_labels = torch.arange(args.search_samples) % classes
    held_labels = (torch.arange(args.held_out) + 3) % classes
    held_ids = range(1000, 1000 + args.held_out)  # noise keys the search never uses, under another seed too
    rows, searches = [], []
    for sampler in args.samplers:
        held_reference = sample(model, held_labels, steps, sampler, cfg, seed=1, sample_ids=held_ids)

        def held_error(plan):
            """(geometric mean, pooled) relative error over the held-out samples, and the per-sample errors."""
            errors = sample_errors(model, plan, held_labels, steps, sampler, cfg, 1, held_reference, held_ids)
            pooled = float((errors * (held_reference.double() ** 2).flatten(1).sum(1).cpu()).sum()
                           / (held_reference.double() ** 2).sum().cpu())
            return float(errors.log().mean().exp()), pooled, errors.tolist()

        for forecast in args.forecasts:
            start = time.perf_counter()
            evaluated, plans = evaluate_candidates(model, max(args.targets), forecast, "float32", search_labels, steps,
                                                   sampler, cfg, 0)
            seconds = time.perf_counter() - start
            searches.append({"sampler": sampler, "forecast": forecast, "seconds": seconds, "candidates": evaluated})
            for target in args.targets:
                chosen = choose(evaluated, target)
                interval = max((c for c in evaluated if c["interval"] and c["compute_fraction"] <= target),
                               key=lambda c: c["compute_fraction"])
                held, held_interval = held_error(plans[chosen["name"]]), held_error(plans[interval["name"]])
                rows.append({"sampler": sampler, "forecast": forecast, "target": target, "chosen": chosen["name"],
                             "compute_fraction": chosen["compute_fraction"], "interval": interval["name"],
                             "search_error": chosen["error"], "search_interval_error": interval["error"],
                             "held_out_error": held[0], "held_out_interval_error": held_interval[0],
                             "held_out_pooled": held[1], "held_out_interval_pooled": held_interval[1],
                             "held_out_per_sample": held[2], "held_out_interval_per_sample": held_interval[2],
                             "search_seconds": seconds, "candidates": len(evaluated)})
                print(rows[-1], flush=True)
    cells = []
    for r in rows:
        search = f"{decibels(r['search_error']):.1f} / {decibels(r['search_interval_error']):.1f}"
        held = f"{decibels(r['held_out_error']):.1f} / {decibels(r['held_out_interval_error']):.1f}"
        pooled = f"{decibels(r['held_out_pooled']):.1f} / {decibels(r['held_out_interval_pooled']):.1f}"
        cells.append([r["sampler"], str(r["forecast"]), str(r["target"]),
                      f"{r['chosen']} ({r['compute_fraction']:.3f})", r["interval"], search, held, pooled])
    lines = table(["sampler", "K", "F", "chosen (fraction)", "interval", "search dB: chosen / interval",
                   "held-out dB: chosen / interval", "held-out pooled dB"], cells)
    meta = {"model": "reference-dit", "device": args.device, "host": platform.node(), "torch": torch.__version__,
            "steps": steps, "cfg_scale": cfg, "search_samples": args.search_samples, "search_seed": 0,
            "held_out": {"samples": args.held_out, "seed": 1, "labels": "(i + 3) % classes", "sample_ids": "1000.."},
            "error": "geometric mean over samples of sum (x - x0)^2 / sum x0^2; dB = -10 log10",
            "searches": searches}
    write_results(args.out, meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
