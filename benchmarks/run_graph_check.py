"""Whole-run CUDA graphs (`Pipeline.load(..., run_graphs=True)`) against the step-by-step engines, batch by batch, on
the serve benchmark's engines: the reference model's quick W8A8-INT8 Inductor engines under the default plan's shape.
Batches are made as the server makes them: requests of up to 4 images with a seed each, labels at random. Each batch
is sampled six ways -- step by step without CUDA graphs (the reference), with a CUDA graph a step, with whole-run
graphs (noise drawn into pinned memory, as they do, and into pageable memory), and whole runs from their static
buffers uncaptured, with and without step graphs -- with the step noise drawn in parallel (as the server does from 8
images of this model on) or serially; the script prints and writes, per bucket and way, how many batches gave
non-finite rows (which rows; the first non-finite step) or differed from the reference. First, each engine graph is
called on its example feeds with NaN placed just before or after each input in memory, and with NaN in the memory
its intermediates will take: an engine that reads outside its inputs or memory it did not write gives other outputs.

Why: session 21's and 22's serve loads with --run-graphs failed requests on non-finite samples, all of them (session
22: 173 batches) in bucket 8 (16 rows), mostly in its last rows; without whole-run graphs none did (session 13).
Session 22's first runs here: at 8 images every batch of the whole-run graphs was non-finite (from step 6, a reuse
step), with serial draws too; run uncaptured from the same buffers its batches were finite but differed from the step
graphs' (by up to 0.43); at 4 and 12 images both were equal to them bitwise (12 differed in one run's order, 4, 8,
12). On the CPU (no pinned memory, no CUDA graphs) the whole runs equal the steps at 8, 16 and 24 rows. GPU only.

    python benchmarks/run_graph_check.py --out benchmarks/results/run-graph-check-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from qandc.artifacts import write_json
from qandc.bench import card_name, config_engines, device_name, make_model
from qandc.model.graphs import example_feeds
from qandc.runtime import Pipeline
from qandc.runtime import pipeline as pipeline_module
from qandc.runtime.pipeline import RunGraph, nonfinite_samples
from qandc.sampling import sampler
from qandc.sampling.sampler import draw_noise

ROOT = Path(__file__).resolve().parents[1]


def batches(size: int, count: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(labels, seeds, sample ids) of `count` batches of `size` images, requests of up to 4 images each."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        labels, seeds, ids = [], [], []
        while len(labels) < size:
            n = min(int(rng.integers(1, 5)), size - len(labels))
            labels += rng.integers(0, 10, n).tolist()
            seeds += [int(rng.integers(0, 2 ** 31))] * n
            ids += list(range(n))
        made.append((labels, seeds, ids))
    return made


class UncapturedRunGraph(RunGraph):
    def _capture(self, labels, x0, noise, y) -> None:
        """As on a CPU: the static buffers, no graph (each batch runs the whole run eagerly from them)."""
        self._static_buffers(labels, x0, noise, y)
        self.captured = (None, None, None, None)


def pageable_draws(generators, shape, count=None, pin_memory=False) -> torch.Tensor:
    """`draw_noise` into pageable memory, whatever `pin_memory` asks."""
    return draw_noise(generators, shape, count)


def generate(pipeline: Pipeline, uncaptured: bool, pageable: bool, labels, seeds, ids) -> torch.Tensor:
    """The batch's samples by `pipeline`; `uncaptured`: its whole runs without a CUDA graph; `pageable`: their
    noise drawn into pageable memory, not pinned."""
    pipeline_module.RunGraph = UncapturedRunGraph if uncaptured else RunGraph
    pipeline_module.draw_noise = pageable_draws if pageable else draw_noise
    try:
        return pipeline.generate(labels, seeds, sample_ids=ids, allow_nonfinite=True).float()
    finally:
        pipeline_module.RunGraph, pipeline_module.draw_noise = RunGraph, draw_noise


def check(ways: dict, size: int, count: int) -> dict:
    """Every way (name -> (pipeline, uncaptured, pageable)) batch by batch against the first: per way, the batches whose
    rows came out not finite (rows by batch; the first non-finite step), those that differ from the first way's
    samples, and the largest difference."""
    results = {name: {"batches": count, "nonfinite": {}, "first_nonfinite_step": {}, "differing": 0,
                      "max_abs_difference": 0.0} for name in ways}
    for i, (labels, seeds, ids) in enumerate(batches(size, count, size)):
        first = None
        for name, (pipeline, uncaptured, pageable) in ways.items():
            images, result = generate(pipeline, uncaptured, pageable, labels, seeds, ids), results[name]
            bad_steps = pipeline.denoiser.nonfinite_steps()
            if bad_steps:
                result["first_nonfinite_step"][i] = bad_steps[0]
            rows = nonfinite_samples(images).nonzero().flatten().tolist()
            if rows:
                result["nonfinite"][i] = rows
            if first is None:
                first = images
                continue
            finite = torch.isfinite(images) & torch.isfinite(first)
            result["max_abs_difference"] = max(result["max_abs_difference"],
                                               float((images - first)[finite].abs().max()))
            result["differing"] += int(not torch.allclose(images[finite], first[finite], rtol=1e-3, atol=1e-3)
                                       or not torch.equal(torch.isfinite(images), torch.isfinite(first)))
    return results


def surrounded(tensor: torch.Tensor, before: bool) -> torch.Tensor:
    """`tensor` copied into one half of a buffer twice its size whose other half (before or after it) holds NaN, or
    for an integer tensor a value far out of any range."""
    fill = float("nan") if tensor.is_floating_point() else 1 << 30
    buffer = torch.full((2 * tensor.numel(),), fill, dtype=tensor.dtype, device=tensor.device)
    part = buffer[tensor.numel():] if before else buffer[:tensor.numel()]
    return part.view(tensor.shape).copy_(tensor)


def neighbour_check(engines: Path, rows: list[int]) -> dict:
    """Each engine graph at each row count on its example feeds, fed as fresh tensors and again with NaN (far
    out-of-range integers) just before or just after each input in memory, and with the caching allocator's free
    memory NaN: an engine whose outputs change reads outside its inputs or memory it did not write. By graph and
    rows: whether each placement gave the same outputs, and any NaN in them."""
    denoiser = Pipeline.load(engines, cuda_graphs=False).denoiser
    results = {}
    for count in rows:
        feeds = example_feeds(denoiser, denoiser.graphs, count)
        for name in denoiser.graphs:
            engine = denoiser.direct_engines[name]
            clean = engine.infer({n: t.clone() for n, t in feeds[name].items()})
            row = {}
            for placement in ("NaN before", "NaN after", "NaN in the free memory"):
                if placement == "NaN in the free memory":  # what the engine allocates starts as NaN
                    torch.full((1 << 28,), float("nan"), device=denoiser.device)  # 1 GiB of NaN, freed at once
                    inputs = {n: t.clone() for n, t in feeds[name].items()}
                else:
                    inputs = {n: surrounded(t, placement == "NaN before") for n, t in feeds[name].items()}
                got = engine.infer(inputs)
                row[placement] = {
                    "same": all(torch.equal(got[o].nan_to_num(7.0), clean[o].nan_to_num(7.0)) for o in clean),
                    "nonfinite_outputs": sorted(o for o in got if not torch.isfinite(got[o].float()).all())}
            results[f"{name} at {count} rows"] = row
            print(f"{name} at {count} rows: {row}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,12", help="images a batch (buckets), comma-separated")
    parser.add_argument("--batches", type=int, default=30, help="batches a bucket and way of drawing")
    parser.add_argument("--draws", default="parallel,serial", help="ways of drawing the step noise")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qandc-run-graph-check"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/run-graph-check-h200.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_graph_check.py: needs a CUDA GPU (whole-run graphs are CUDA graphs)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    engines, _ = config_engines("reference", make_model("reference", "cuda"), "w8a8-int8", "default-shape",
                                args.work, sorted(2 * s for s in sizes))
    neighbours = neighbour_check(engines, sorted(2 * s for s in sizes))
    ways = {"step by step, no CUDA graphs": (Pipeline.load(engines, cuda_graphs=False), False, False),
            "step graphs": (Pipeline.load(engines), False, False),
            "whole-run graphs": (Pipeline.load(engines, run_graphs=True), False, False),
            "whole-run graphs, pageable draws": (Pipeline.load(engines, run_graphs=True), False, True),
            "whole runs uncaptured, step graphs": (Pipeline.load(engines, run_graphs=True), True, False),
            "whole runs uncaptured, no CUDA graphs": (Pipeline.load(engines, cuda_graphs=False, run_graphs=True),
                                                      True, False)}
    parallel = sampler.PARALLEL_DRAW_VALUES
    results = {}
    for draws in args.draws.split(","):
        sampler.PARALLEL_DRAW_VALUES = {"parallel": 0, "serial": float("inf")}[draws]
        for size in sizes:
            for name, row in check(ways, size, args.batches).items():
                results[f"{size} images, {draws} draws, {name}"] = row
                print(f"{size} images, noise drawn {draws}, {name}: {len(row['nonfinite'])} of {row['batches']} "
                      f"batches not finite {row['nonfinite']} (first steps {row['first_nonfinite_step']}); "
                      f"{row['differing']} differ from the first way's (at most {row['max_abs_difference']:.3g})",
                      flush=True)
    sampler.PARALLEL_DRAW_VALUES = parallel
    write_json(args.out, {"card": card_name(), "device_name": device_name(),
                          "engines": "reference model, quick W8A8-INT8 recipe, default plan shape (serve_load.py's)",
                          "results": results, "engines_beside_nan": neighbours})
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
