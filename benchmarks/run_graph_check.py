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
Session 23 (H200): whole-run graphs are not the cause. At 8 images the reference way itself (step by step, no CUDA
graphs) gave non-finite batches, and the compiled full graph at 16 rows gave other outputs -- its cached trunk and
forecast difference only, NaN with NaN just before any input -- whenever the memory around its inputs or its
intermediates changed; the same program run eagerly gave the same outputs with NaN in all free memory, the reuse graph
was unaffected, and the INT8 Triton GEMM alone was exact at every shape of the program with NaN around it
(`--localize 16`). The graph's last kernel (Inductor's output code: `gpu-logs/localize-full16-code-h200-session23.txt`)
is a looped reduction that stores the trunk in its first loop and reads it back in its second for the forecast's
difference, with no barrier between the two: what `inductor_backend.one_pass_reductions` now prevents. Its other
foreign kernel, cuDNN's attention on strided q, k, v, is checked alone by `--attention`; `--no-cudnn-attention`
compiles without it.

    python benchmarks/run_graph_check.py  # writes benchmarks/results/run-graph-check-<card>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def nan_memory(device) -> None:
    """The caching allocator's free memory NaN: 1 GiB of NaN, freed at once."""
    torch.full((1 << 28,), float("nan"), device=device)


def same_outputs(got: dict, clean: dict) -> bool:
    """Whether an engine's outputs `got` equal `clean` bitwise, NaN where NaN."""
    return all(torch.equal(got[o].nan_to_num(7.0), clean[o].nan_to_num(7.0)) for o in clean)


def nonfinite_outputs(got: dict) -> list[str]:
    """The names of the outputs holding NaN or Inf."""
    return sorted(o for o in got if not torch.isfinite(got[o].float()).all())


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
                    nan_memory(denoiser.device)
                    inputs = {n: t.clone() for n, t in feeds[name].items()}
                else:
                    inputs = {n: surrounded(t, placement == "NaN before") for n, t in feeds[name].items()}
                got = engine.infer(inputs)
                row[placement] = {
                    "same": same_outputs(got, clean),
                    "nonfinite_outputs": nonfinite_outputs(got)}
            results[f"{name} at {count} rows"] = row
            print(f"{name} at {count} rows: {row}", flush=True)
    return results


class FirstNonfinite(TorchDispatchMode):
    """Records the first ops (up to 8) whose floating outputs are not finite although their floating inputs are."""

    def __init__(self):
        super().__init__()
        self.ops, self.count = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += 1
        if len(self.ops) < 8:
            floats = lambda tree: [t for t in pytree.tree_leaves(tree)  # noqa: E731
                                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if (any(not torch.isfinite(t.float()).all() for t in floats(out))
                    and all(torch.isfinite(t.float()).all() for t in floats((args, kwargs)))):
                self.ops.append({"op_index": self.count, "op": str(func),
                                 "inputs": [[str(t.dtype), list(t.shape)] for t in pytree.tree_leaves((args, kwargs))
                                            if isinstance(t, torch.Tensor)]})
        return out


def localize(engines: Path, rows: int) -> dict:
    """Where an engine reads memory it did not write, at `rows` rows: (1) the compiled engines with NaN beside one
    input at a time; (2) the programs run eagerly with NaN in the free memory, the first ops giving non-finite
    outputs from finite inputs; (3) the INT8 Triton GEMM alone at every weight shape of the full program and row
    counts of its callers, its output from NaN memory and its A beside other values, against integer arithmetic."""
    from qandc.engines.triton_int8 import int8_gemm

    results = {"compiled, NaN beside one input": {}, "eager, NaN in the free memory": {}, "int8_gemm alone": {}}
    compiled, eager = (Pipeline.load(engines, compile=c, cuda_graphs=False).denoiser for c in (True, False))
    feeds = example_feeds(compiled, compiled.graphs, rows)
    for name in compiled.graphs:
        engine = compiled.direct_engines[name]
        clean = engine.infer({n: t.clone() for n, t in feeds[name].items()})
        for changed in feeds[name]:
            for before in (True, False):
                inputs = {n: surrounded(t, before) if n == changed else t.clone() for n, t in feeds[name].items()}
                got = engine.infer(inputs)
                key = f"{name}: NaN {'before' if before else 'after'} {changed}"
                results["compiled, NaN beside one input"][key] = found = {
                    "same": same_outputs(got, clean),
                    "nonfinite_outputs": nonfinite_outputs(got)}
                print(f"compiled, {key}: {found}", flush=True)
        engine = eager.direct_engines[name]
        clean = engine.infer({n: t.clone() for n, t in feeds[name].items()})
        nan_memory(eager.device)
        with FirstNonfinite() as mode:
            got = engine.infer({n: t.clone() for n, t in feeds[name].items()})
        results["eager, NaN in the free memory"][name] = {
            "same": same_outputs(got, clean),
            "ops": mode.count, "first_nonfinite_ops": mode.ops}
        print(f"eager, NaN in the free memory, {name}: {results['eager, NaN in the free memory'][name]}", flush=True)
    tokens = (compiled.config.input_size // compiled.config.patch_size) ** 2
    weights = {tuple(b.shape): b for b in eager.direct_engines["full"].module.buffers()
               if b.dtype == torch.int8 and b.dim() == 2}
    generator = torch.Generator(device=eager.device).manual_seed(0)
    for (n, k), weight in sorted(weights.items()):
        scale = torch.rand(n, device=eager.device, generator=generator) * 1e-3
        bias = torch.randn(n, device=eager.device, generator=generator).to(torch.bfloat16)
        for m in sorted({r for c in (rows // 2, rows, rows + rows // 2) for r in (c, c * tokens)}):
            x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=eager.device, generator=generator)
            expected = ((x.double() @ weight.double().t()).float()  # exact: |sums| < 2^53
                         * scale + bias.float()).to(torch.bfloat16)
            row = {}
            for placement in ("fresh", "NaN memory", "127 before", "127 after"):
                if placement == "NaN memory":
                    nan_memory(eager.device)
                a = x.clone()
                if placement.startswith("127"):
                    buffer = torch.full((2 * x.numel(),), 127, dtype=torch.int8, device=eager.device)
                    a = (buffer[x.numel():] if "before" in placement else buffer[:x.numel()]).view(x.shape).copy_(x)
                got = int8_gemm(a, weight, scale, bias)
                row[placement] = {"nonfinite": int((~torch.isfinite(got.float())).sum()),
                                  "max_abs_difference": float((got.float() - expected.float()).nan_to_num(1e9)
                                                              .abs().max())}
            results["int8_gemm alone"][f"M={m} N={n} K={k}"] = row
            print(f"int8_gemm alone, M={m} N={n} K={k}: {row}", flush=True)
    return results


def attention_check() -> dict:
    """cuDNN's SDPA kernel (the one Inductor's engines call) on q, k, v as the engines pass them -- strided views of
    one [B, S, 3 * H * D] qkv buffer -- and contiguous, at the reference model's shapes (B rows, 4 heads of 64, 256
    tokens) and DiT-XL/2's, against SDPA in float32: with the free memory NaN and with NaN just before / after the
    qkv buffer, its non-finite outputs and largest difference."""
    results = {}
    for b, h, d in [(8, 4, 64), (16, 4, 64), (24, 4, 64), (32, 4, 64), (32, 16, 72)]:
        generator = torch.Generator(device="cuda").manual_seed(b)
        qkv = torch.randn(b, 256, 3 * h * d, device="cuda", generator=generator).to(torch.bfloat16)
        heads = lambda buffer: [buffer[..., i * h * d:(i + 1) * h * d].view(b, 256, h, d).transpose(1, 2)  # noqa: E731
                                for i in range(3)]  # q, k, v: strided views of the one buffer
        expected = torch.nn.functional.scaled_dot_product_attention(*[t.float() for t in heads(qkv)])
        for layout in ("strided", "contiguous"):
            for placement in ("fresh", "NaN memory", "NaN before", "NaN after"):
                if placement == "NaN memory":
                    nan_memory("cuda")
                buffer = qkv.clone() if placement in ("fresh", "NaN memory") else surrounded(qkv, "before" in placement)
                q, k, v = heads(buffer)
                if layout == "contiguous":
                    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
                try:
                    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0].float()
                    row = {"nonfinite": int((~torch.isfinite(out)).sum()),
                           "max_abs_difference": float((out - expected).nan_to_num(1e9).abs().max())}
                except RuntimeError as e:
                    row = {"error": str(e)[:200]}
                results[f"B={b} H={h} D={d} {layout} {placement}"] = row
                print(f"cuDNN attention, B={b} H={h} D={d} {layout} {placement}: {row}", flush=True)
    return results


def write_results(out: Path, **results) -> int:
    """`results` with the card into `out`; the exit status."""
    write_json(out, {"card": card_name(), "device_name": device_name(), **results})
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,12", help="images a batch (buckets), comma-separated")
    parser.add_argument("--batches", type=int, default=30, help="batches a bucket and way of drawing")
    parser.add_argument("--draws", default="parallel,serial", help="ways of drawing the step noise")
    parser.add_argument("--localize", type=int, metavar="ROWS",
                        help="only find where the engines read memory they did not write, at ROWS rows")
    parser.add_argument("--attention", action="store_true", help="only check cuDNN's attention kernel")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="SDPA without its cuDNN backend in this process: the engines compile with another, "
                             "past Inductor's caches (whose graphs may call cuDNN's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qandc-run-graph-check"))
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/"
                        "run-graph-check-<card>.json, run-graph-localize-<card>.json with --localize, "
                        "cudnn-attention-<card>.json with --attention)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_graph_check.py: needs a CUDA GPU (whole-run graphs are CUDA graphs)", file=sys.stderr)
        return 2
    name = "cudnn-attention" if args.attention else "run-graph-localize" if args.localize else "run-graph-check"
    out = args.out or ROOT / f"benchmarks/results/{name}-{card_name()}.json"
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch._inductor.config.force_disable_caches = True
    if args.attention:
        return write_results(out, cudnn_attention=attention_check())
    sizes = [int(s) for s in args.sizes.split(",")]
    engines, _ = config_engines("reference", make_model("reference", "cuda"), "w8a8-int8", "default-shape",
                                args.work, sorted(2 * s for s in sizes))
    if args.localize:
        return write_results(out, rows=args.localize, localized=localize(engines, args.localize))
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
    return write_results(out, engines="reference model, quick W8A8-INT8 recipe, default plan shape (serve_load.py's)",
                         results=results, engines_beside_nan=neighbours)


if __name__ == "__main__":
    sys.exit(main())
