"""Where a step's time goes: torch.profiler over the Inductor engines as the runtime runs them (compiled, each call a
replayed CUDA graph), kernels grouped by name into GEMMs, attention, norms / modulation, quantize, elementwise,
copies and other, against the FP8 floor of the step (its FLOPs over the FP8 GEMM rate measured here, as
`qandc bench` computes it).

Steps (default): DiT-XL/2 with the bench's seeded random weights, 32 rows (the bench's batch 16 with CFG), every
graph of `--plan` (`none`: the full step; `interval=3`: the full and the reuse step) at each precision. The engines
are the bench's (`qandc.bench.config_engines`: the same folder names, so `--work /tmp/qandc-bench` reuses what the
bench built). Writes benchmarks/results/profile-step-<card>.{json,md}.

Sampling runs (`--run`): whole runs of `--images` labels under `--plan` with each `--samplers`, reporting per step
the wall time, the GPU's busy time (the union of its kernels' intervals) and the host's time per step (the period of
the sampler's loop, the part of it spent in the engine call, and the part spent waiting in synchronising CUDA calls),
to tell whether sampling is host-bound. Writes benchmarks/results/profile-run-<card>-<model>-<plan>.{json,md}.

Each finished row is kept in --state (a rerun skips it); the results hold every row of the state at the same model,
plan and rows, so variants (`--quantized-mode`, `--inductor-config`, `--fused-fp8-mlp`) share one table. On the
CPU (`--model tiny` for a smoke run) the engines run eagerly and the profile groups CPU ops by self time.

    PYTHONPATH=$PWD python benchmarks/profile_step.py --work /tmp/qandc-bench --precisions bf16 w8a8-fp8 w8a8-int8
    PYTHONPATH=$PWD python benchmarks/profile_step.py --run --model reference --plan interval=4,forecast=1
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from _common import config_params, table
from qandc.artifacts import atomic_path, read_json, write_json
from qandc.bench import (FP8_OPTION_SUFFIXES, _slug, card_name, config_engines, device_name, fp8_floor,
                         fp8_suffix, full_step_flops, load_ready, make_model)
from qandc.engines import cublaslt_fp8, inductor_backend

ROOT = Path(__file__).resolve().parents[1]
ENGINES_MODE = inductor_backend.COMPILE_MODES[True]  # the quantized engines' own mode (before --quantized-mode)

# first match wins: attention before GEMMs (cutlass attention kernels), norms before quantize (Inductor fuses
# LayerNorm + modulate + quantize into one kernel, counted as a norm; `kernels` shows what fused)
GROUPS = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("gemm", r"gemm|scaled_mm|cutlass|xmma|nvjet|triton_tem|_mm_|\bmm\b|addmm|bmm|matmul|int8_linear"),
    ("norm/modulation", r"norm|var_mean"),
    ("quantize", r"clamp|round|float8|fp8|e4m3|quantiz"),
    ("copies", r"memcpy|memset|direct_copy|aten::copy_|aten::clone|catarray|aten::cat\b|aten::contiguous"),
    ("elementwise", r"triton_poi|elementwise|vectorized|unrolled|gelu|silu|tanh|aten::(add|mul|sub|div|neg|exp)"),
    ("other", r""),
)
SYNC_CALLS = re.compile(r"cuda(Stream|Device|Event)Synchronize|cudaMemcpy$|cudaMemcpy[^A]")  # host waits on the GPU
TOP_KERNELS = 12  # kernels a markdown table shows (the JSON keeps them all)
ANNOTATION = "profile_step::"  # record_function ranges of this script, not work (qandc:: is its custom ops')
DEVICE_WAITS = re.compile(r"^(stream|event|context) (sync|wait)", re.I)  # CUPTI's records of waits, not work


TRITON_POINTWISE = re.compile(r"^triton_(poi|red|per)_")  # Inductor's generated non-GEMM kernels
FED_GEMM = re.compile(r"_(scaled_mm|addmm|bmm|mm)_")  # ...named after the GEMM they feed or follow too


def group_of(name: str) -> str:
    """The group of a kernel or CPU op name (an Inductor pointwise or reduction kernel is never a GEMM, though its
    name may carry the GEMM whose input it quantizes: `triton_poi_fused__scaled_mm__to_copy_clamp_div_gelu`)."""
    lower = name.lower()
    if TRITON_POINTWISE.match(lower):
        lower = FED_GEMM.sub("_", lower)
    return next(group for group, pattern in GROUPS if re.search(pattern, lower))


def work_events(prof, device: str) -> list[tuple[str, float, float, float]]:
    """(name, start µs, end µs, time µs) of the profile's work: on CUDA its device events (kernels, memcpy,
    memset), on the CPU its ops by self time (nested ops counted once)."""
    events = []
    for e in prof.events():
        if (device == "cuda" and e.device_type == DeviceType.CUDA and not DEVICE_WAITS.match(e.name)
                and not e.is_user_annotation):  # record_function ranges on the GPU's timeline: this script's, and
            # Inductor's around each compiled graph ("## Call CompiledFxGraph ... ##"), as torch's own tables skip them
            events.append((e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us()))
        elif device == "cpu" and e.device_type == DeviceType.CPU and not e.name.startswith(ANNOTATION):
            events.append((e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total))
    return events


def launchers(prof_events, per: int) -> dict[str, dict[str, float]]:
    """Each kernel's launching ops (the innermost PyTorch op or custom op the profiler links it to, with its first
    input's shape) and how often a step, by kernel name: where a memset or a copy comes from. Kernels replayed in a
    CUDA graph link to no op but this script's range around the replay, which is left out (`--no-cuda-graphs`
    attributes them)."""
    found: dict[str, dict[str, float]] = {}
    for e in prof_events:
        first = e.input_shapes[0] if e.input_shapes else None  # recorded with record_shapes: which copy, which GEMM
        op = f"{e.name} {list(first)}" if first else e.name
        for kernel in [] if e.name.startswith(ANNOTATION) else e.kernels:
            ops = found.setdefault(kernel.name[:160], {})  # as `grouped` names kernels
            ops[op] = ops.get(op, 0.0) + 1 / per
    return found


def busy_us(events) -> float:
    """The union of the events' intervals (µs): time the device had work."""
    total, end = 0.0, float("-inf")
    for _, s, e, _ in sorted(events, key=lambda ev: ev[1]):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def grouped(events, per: int) -> dict:
    """Every kernel's ms, share and count per step over `per` steps, by time, and their groups' (`group_totals`)."""
    kernels = {}
    for name, _, _, us in events:
        k = kernels.setdefault(name, {"name": name[:160], "ms": 0.0, "count": 0})
        k["ms"] += us / 1e3 / per
        k["count"] += 1 / per
    return group_totals(sorted(kernels.values(), key=lambda k: -k["ms"]))


def group_totals(kernels: list[dict]) -> dict:
    """{"groups": per group ms, share and kernels per step; "work_ms"; "kernels": each with its group and share}."""
    groups = {g: {"ms": 0.0, "kernels": 0.0} for g, _ in GROUPS}
    for k in kernels:
        k["group"] = group_of(k["name"])
        groups[k["group"]]["ms"] += k["ms"]
        groups[k["group"]]["kernels"] += k["count"]
    total = sum(g["ms"] for g in groups.values())
    for g in [*groups.values(), *kernels]:
        g["share"] = g["ms"] / total if total else 0.0
    return {"groups": groups, "work_ms": total, "kernels": kernels}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(call, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def autotuned_configs() -> dict:
    """The configs Triton's autotuning chose for qandc's kernels that ran in this process (the last choice of each:
    kernels keyed by shape keep one a shape), by kernel name. GPU only (the CPU machines have no Triton)."""
    from qandc.engines.autotune_choices import autotuners

    return {name: config_params(k.best_config) for name, k in autotuners().items()
            if getattr(k, "best_config", None) is not None}


def back_to_back_ms(call, repeats: int, device: str) -> float:
    """ms a call of `repeats` calls launched back to back, one wait at the end: as a sampling run meets them (the
    host's work for a call overlaps the device's for the one before), where `median_ms` waits after each."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def activities(device: str) -> list:
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]


def profile_graphs(pipeline, rows: int, repeats: int) -> list[dict]:
    """A row per graph of the pipeline's engines: unprofiled median ms per call, then the grouped profile of
    `repeats` calls."""
    from qandc.model.graphs import example_feeds

    denoiser, device = pipeline.denoiser, pipeline.device.type
    feeds = example_feeds(denoiser, denoiser.graphs, rows)
    rows_out = []
    for name, spec in denoiser.graphs.items():
        call = lambda: denoiser.forward_graph(spec, feeds[name])  # noqa: E731
        for _ in range(3):
            call()
        ms = median_ms(call, max(repeats, 10), device)
        with profile(activities=activities(device), record_shapes=True) as prof:
            for _ in range(repeats):
                with record_function(f"{ANNOTATION}{name}"):
                    call()
            _sync(device)
        events = work_events(prof, device)
        if not events:
            raise RuntimeError(f"the profiler recorded no {device} work in the {name} calls (kernels replayed in CUDA "
                               "graphs not traced?): rerun with --no-cuda-graphs")
        row = {"graph": name, "ms_step": ms, "ms_step_back_to_back": back_to_back_ms(call, max(repeats, 10), device),
               "busy_ms_per_step": busy_us(events) / 1e3 / repeats,
               **grouped(events, repeats)}
        by = launchers(prof.events(), repeats)
        for k in row["kernels"]:
            if k["name"] in by:
                k["launched_by"] = by[k["name"]]
        rows_out.append(row)
    return rows_out


class StepClock:
    """Wraps a denoiser's forward_graph while open: host timestamps at each call's start and end (the sampler's
    steps)."""

    def __init__(self, denoiser):
        self.denoiser, self.inner = denoiser, denoiser.forward_graph
        self.starts, self.ends = [], []

    def __enter__(self):
        self.denoiser.forward_graph = self
        return self

    def __exit__(self, *exc):
        del self.denoiser.forward_graph  # the class's method again

    def __call__(self, spec, feeds):
        self.starts.append(time.perf_counter())
        with record_function(f"{ANNOTATION}step"):
            out = self.inner(spec, feeds)
        self.ends.append(time.perf_counter())
        return out


def profile_run(pipeline, labels, steps: int, sampler: str) -> dict:
    """One timed sampling run (host timestamps per step) and one profiled run: per step the wall time, the device's
    busy time, the host's loop period, its time in the engine call and its time in synchronising CUDA calls."""
    device = pipeline.device.type
    run = lambda: pipeline.generate(labels, 0, steps=steps, sampler=sampler, use_vc=False)  # noqa: E731
    run()  # warm-up: captures the CUDA graphs at this batch
    _sync(device)
    with StepClock(pipeline.denoiser) as clock:
        start = time.perf_counter()
        run()
        _sync(device)
        wall = (time.perf_counter() - start) * 1e3
    n = len(clock.starts)
    period = (clock.starts[-1] - clock.starts[0]) * 1e3 / (n - 1) if n > 1 else wall
    in_engine = sum(e - s for s, e in zip(clock.starts, clock.ends)) * 1e3 / n
    with profile(activities=activities(device)) as prof:
        start = time.perf_counter()
        run()
        _sync(device)
        wall_profiled = (time.perf_counter() - start) * 1e3
    events = work_events(prof, device)
    sync = sum(e.time_range.elapsed_us() for e in prof.events() if SYNC_CALLS.search(e.name)) / 1e3
    row = {"sampler": sampler, "steps": steps, "images": len(labels), "engine_calls": n,
           "wall_ms_per_step": wall / n, "images_per_s": len(labels) / wall * 1e3,
           "host_loop_ms_per_step": period, "host_in_engine_ms_per_step": in_engine,
           "wall_ms_per_step_profiled": wall_profiled / n, "host_sync_ms_per_step_profiled": sync / n,
           "busy_ms_per_step_profiled": busy_us(events) / 1e3 / n, **grouped(events, n)}
    row["busy_fraction"] = row["busy_ms_per_step_profiled"] / row["wall_ms_per_step_profiled"]
    row["reading"] = reading(row, device)
    return row


def reading(row: dict, device: str) -> str:
    """Host- or device-bound, in words, from the profiled run's busy fraction and the host's time outside waits."""
    if device != "cuda":
        return "CPU run: host and device are one"
    host = row["host_loop_ms_per_step"] - row["host_sync_ms_per_step_profiled"]
    if row["busy_fraction"] > 0.9:
        return "GPU-bound: the GPU is busy over 90% of the run"
    if host > 0.8 * row["wall_ms_per_step"]:
        return "host-bound: the host's own time per step (outside waits) is the step's wall time; the GPU idles"
    return "neither: the GPU idles while the host waits (synchronising calls or gaps between graphs)"


def persistent_reductions_up_to(limit: int) -> None:
    """The engines' one-pass reduction limit for this process (`inductor_backend.ONE_PASS_REDUCTIONS_UP_TO`, 2048
    by default since session 23; Inductor's own is 1024 for inner reductions, 64 for others): row reductions of up
    to `limit` elements compile as one-pass Triton kernels. Compile cache keys carry it."""
    inductor_backend.ONE_PASS_REDUCTIONS_UP_TO = limit


def make(name: str, device: str):
    """The bench's models, or a tiny random DiT (`tiny`: CPU smoke runs)."""
    if name != "tiny":
        return make_model(name, device)
    from qandc.model import DiT, DiTConfig, initialize_weights

    config = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return initialize_weights(DiT(config), seed=0, zero_init=False).to(device).eval()


def state_key(meta: dict, row: dict) -> str:
    """The state file name of a row's variant (rows of one key: one profile, its graphs or one run); every setting
    that changes what ran is in it."""
    quantized_mode = row["compile_mode"] if row["precision"] != "bf16" and row["compile_mode"] != ENGINES_MODE else ""
    return (f"{meta['model']}--{row['precision']}--{_slug(meta['plan'])}--{'run' if 'images' in meta else 'step'}"
            f"{meta['batch_rows']}" + (f"-{row['sampler']}" if row.get("sampler") else "")
            + ("" if meta["cuda_graphs"] or not meta["compiled"] else "-nographs")
            + (f"-{quantized_mode}" if quantized_mode else "")
            + "".join(f"-{k}={v}" for k, v in sorted(row.get("inductor_config", {}).items()))
            + (f"-persistent{row['persistent_reductions_up_to']}" if row.get("persistent_reductions_up_to") else "")
            + fp8_suffix(row)
            + ("-cublaslt" if row.get("fp8_mlp_kernel") == "cublaslt" else "")
            + ("-autotuned" if row.get("cublaslt_autotune") else "")
            + (f"-norm-{row['norm_rows_as']}" if row.get("norm_rows_as") else ""))  # session 15's norm probes


def seed_state(state: Path, meta: dict, seed: dict) -> None:
    """Write the rows of an earlier results file `seed` whose variant `state` lacks (same model, plan, rows and
    CUDA-graph setting only), so that rows measured on an earlier machine stay in the results."""
    if any(seed.get(k) != meta.get(k) for k in ("card", "model", "plan", "batch_rows", "images", "cuda_graphs")):
        return
    variants: dict[str, list] = {}
    for row in seed["rows"]:
        variants.setdefault(state_key(meta, row), []).append(row)
    for key, rows in variants.items():
        if not (state / f"{key}.json").is_file():
            write_json(state / f"{key}.json", {"rows": rows})


def compiled_as(row: dict) -> str:
    """The Inductor mode of a row, with the config settings it ran under, its persistent-reduction limit, whether
    its FP8 MLPs were fused and whether its FP8 GEMMs promoted their running sums."""
    return " ".join([row.get("compile_mode", ""), *(f"{k}={v}" for k, v in row.get("inductor_config", {}).items()),
                     *([f"persistent reductions to {row['persistent_reductions_up_to']}"]
                       if row.get("persistent_reductions_up_to") else []),
                     *([f"fused FP8 MLP ({row.get('fp8_mlp_kernel', 'triton')}"
                        f"{', autotuned' if row.get('cublaslt_autotune') else ''})"] if row.get("fused_fp8_mlp")
                       else []),
                     *([f"fused FP8 norms{f' (rows as {row[k]})' if row.get(k := 'norm_rows_as') else ''}"]
                       if row.get("fused_fp8_norm") else []),
                     *(["fused FP8 attention"] if row.get("fused_fp8_attention") else []),  # session 28's row:
                     # a Triton kernel of the attention + its output's quantize, slower in the step; removed since
                     *(["FP8 fast accumulation"] if row.get("fp8_fast_accum") else [])])


def step_markdown(meta: dict, rows: list[dict]) -> str:
    floor = meta.get("fp8_floor_ms")
    lines = [f"# Step profile: {meta['model']}, {meta['batch_rows']} rows, plan {meta['plan']} ({meta['card']}, "
             f"{meta['device_name']}, torch {meta['torch']})", "",
             f"FLOPs of a full step {meta['flops_full_step'] / 1e9:.4g} GFLOP; FP8 floor "
             + (f"{floor:.2f} ms at {meta['fp8_gemm_tflops']:.0f} TFLOP/s (`_scaled_mm`, {meta['gemm_shape']})"
                if floor else "not measured (no GPU)")
             + ". ms step: median of unprofiled calls, each waited for; back to back: unprofiled calls launched "
             "one after another, as a sampling run launches them (– where not measured); ms busy: the device's "
             "busy time in the profiled calls; "
             "per group: ms per step (share of the work) ×kernels per step.", ""]
    groups = [g for g, _ in GROUPS]

    def sitting(row: dict) -> dict:  # when the row ran, and that sitting's floor
        return row.get("sitting", {})

    if len({sitting(r).get("started") for r in rows}) > 1:  # rows resumed on another machine
        lines += ["Rows from several sittings (machines of one card, not one run): compare kernels and groups "
                  "across them, step times only roughly.", ""]
    cells = [[r["precision"], compiled_as(r), r["graph"], sitting(r).get("started", "–"),
              f"{r['ms_step']:.2f}",
              f"{r['ms_step_back_to_back']:.2f}" if "ms_step_back_to_back" in r else "–",
              f"{r['busy_ms_per_step']:.2f}",
              f"{r['ms_step'] / row_floor:.2f}x"
              if (row_floor := sitting(r).get("fp8_floor_ms") or floor) and r["graph"] == "full" else "–",
              *(f"{r['groups'][g]['ms']:.2f} ({r['groups'][g]['share']:.0%}) ×{r['groups'][g]['kernels']:.0f}"
                for g in groups)] for r in rows]
    lines += table(["precision", "Inductor mode", "graph", "sitting", "ms step", "back to back", "ms busy", "/ floor",
                    *groups], cells)
    for r in rows:
        lines += ["", f"Top kernels, {r['precision']} ({compiled_as(r)}) {r['graph']}:", ""]
        launched = any("launched_by" in k for k in r["kernels"])
        lines += table(["kernel", "group", "ms per step", "share", "per step", *(["launched by"] if launched else [])],
                       [[f"`{k['name'][:100]}`", k["group"], f"{k['ms']:.3f}", f"{k['share']:.1%}", f"{k['count']:g}",
                         *([", ".join(f"`{op}` ×{n:g}" for op, n in k.get("launched_by", {}).items())]
                           if launched else [])]
                        for k in r["kernels"][:TOP_KERNELS]])
    return "\n".join(lines) + "\n"


def run_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Sampling-run profile: {meta['model']}, {meta['images']} images, plan {meta['plan']} "
             f"({meta['card']}, {meta['device_name']}, torch {meta['torch']})", "",
             "ms per step (engine calls); host loop: the sampler's period per step; in engine: host time inside "
             "the engine call; sync: host time in synchronising CUDA calls (profiled run); busy: the GPU's kernels' "
             "union (profiled run).", ""]
    cells = [[r["precision"], r["sampler"], f"{r['images_per_s']:.0f}", f"{r['wall_ms_per_step']:.2f}",
              f"{r['host_loop_ms_per_step']:.2f}", f"{r['host_in_engine_ms_per_step']:.2f}",
              f"{r['host_sync_ms_per_step_profiled']:.2f}", f"{r['busy_ms_per_step_profiled']:.2f}",
              f"{r['wall_ms_per_step_profiled']:.2f}", f"{r['busy_fraction']:.0%}", r["reading"]] for r in rows]
    lines += table(["precision", "sampler", "images/s", "wall", "host loop", "in engine", "sync", "busy",
                    "wall (profiled)", "busy share", "reading"], cells)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-xl-2", choices=("dit-xl-2", "reference", "tiny"))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "w8a8-fp8", "w8a8-int8"],
                        choices=("bf16", "w8a8-fp8", "w8a8-int8"))
    parser.add_argument("--plan", default="none", help="cache spec, or default-shape (the bench's); default none")
    parser.add_argument("--rows", type=int, default=32, help="rows a step (steps mode; default 32, the bench's)")
    parser.add_argument("--repeats", type=int, default=5, help="profiled calls per graph (default 5)")
    parser.add_argument("--run", action="store_true", help="profile whole sampling runs instead of single steps")
    parser.add_argument("--images", type=int, default=250, help="labels a sampling run (--run; default 250)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (--run; default 50)")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "ddpm"], choices=("ddim", "ddpm"))
    parser.add_argument("--work", default="/tmp/qandc-bench",
                        help="engines, recipes and Inductor's cache (the bench's --work default)")
    parser.add_argument("--state", default=".profile-state", help="finished rows (a rerun skips them)")
    parser.add_argument("--seed-from", type=Path,
                        help="results JSON whose rows a missing --state takes (a new machine keeps no state); "
                             "rows of another model, plan, row count or CUDA-graph setting are left out")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure this command's variants again, replacing their rows in --state (and those "
                             "--seed-from gave it): a kernel changed under the same settings")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run the compiled engines without CUDA graphs (where a profile of graph replays is empty)")
    parser.add_argument("--card", help="card name in the file names (default from the device: h200, cpu)")
    parser.add_argument("--quantized-mode", choices=("default", "max-autotune-no-cudagraphs"),
                        help="Inductor mode for the W8A8 engines instead of the engines' own (default mode, "
                             "`_scaled_mm` an external cuBLASLt call): max-autotune lets Inductor try its Triton "
                             "scaled-mm templates, into whose epilogue the next pointwise ops can fuse (issue 17)")
    parser.add_argument("--inductor-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for every compile of this run, e.g. "
                             "triton.multi_kernel=1 (persistent reductions up to 16384 elements: DiT-XL/2's 1152-wide "
                             "LayerNorm kernels are looped reductions at the default's 1024); rows kept apart")
    parser.add_argument("--persistent-reductions-up-to", type=int, metavar="N",
                        help="one-pass Triton kernels for row reductions of up to N elements (the engines' "
                             "default: 2048; Inductor's own limit: 1024, DiT-XL/2's rows are 1152 wide); rows kept "
                             "apart")
    parser.add_argument("--fused-fp8-mlp", action="store_true",
                        help="W8A8-FP8 engines with fc1, GELU and fc2's activation quantize as one Triton kernel "
                             "(qandc.engines.triton_fp8) instead of cuBLASLt + an Inductor kernel; rows kept apart")
    parser.add_argument("--fused-fp8-norm", action="store_true",
                        help="W8A8-FP8 engines with each residual add, LayerNorm, modulation and quantize before qkv "
                             "and fc1 as one Triton kernel of several rows a program (qandc.engines.triton_norm) "
                             "instead of Inductor's; rows kept apart")
    parser.add_argument("--fp8-mlp-kernel", choices=("auto", "triton"), default="auto",
                        help="the fused MLP's kernel: auto takes cuBLASLt's GELU epilogue where it can run "
                             "(nvmath-python installed, compute capability 8.9+; qandc.engines.cublaslt_fp8), else "
                             "the Triton kernel; triton: the Triton kernel always. Rows record the one that ran")
    parser.add_argument("--fp8-fast-accum", action="store_true",
                        help="W8A8-FP8 engines whose GEMMs keep their running sums without float32 promotion "
                             "(`_scaled_mm(use_fast_accum=True)`, the fused kernel's too); rows kept apart")
    args = parser.parse_args(argv)
    if args.quantized_mode:
        inductor_backend.COMPILE_MODES[True] = args.quantized_mode
    inductor_settings = dict(setting.split("=", 1) for setting in args.inductor_config if "=" in setting)
    unknown = set(inductor_settings) - set(torch._inductor.config.get_config_copy())
    if len(inductor_settings) < len(args.inductor_config) or unknown:
        parser.error(f"--inductor-config takes KEY=VALUE of torch._inductor.config: {args.inductor_config}")
    torch._inductor.config.load_config({k: ast.literal_eval(v) for k, v in inductor_settings.items()})
    cublaslt_fp8.ENABLED = args.fp8_mlp_kernel == "auto"
    persistent = args.persistent_reductions_up_to
    if persistent:
        persistent_reductions_up_to(persistent)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # CUPTI set up before any CUDA graph is captured, so that their replays are traced
        with profile(activities=activities(device)):
            torch.zeros(1, device=device)
    card = args.card or card_name()
    work, state = Path(args.work), Path(args.state)
    work.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))  # the bench's, with its --work
    model = make(args.model, device)
    rows = 2 * args.images if args.run else args.rows
    kind = "run" if args.run else "step"
    meta = {"card": card, "device_name": device_name(device),
            "torch": torch.__version__, "model": args.model, "plan": args.plan, "batch_rows": rows,
            "compiled": device == "cuda", "cuda_graphs": device == "cuda" and not args.no_cuda_graphs}
    if args.run:
        meta["images"] = args.images
    else:
        floor = fp8_floor(model, rows) if device == "cuda" else {"flops_full_step": full_step_flops(model, rows)}
        meta.update(floor)
    sitting = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "fp8_floor_ms": meta.get("fp8_floor_ms")}
    if args.seed_from:
        seed_state(state, meta, read_json(args.seed_from))
    for precision in args.precisions:
        fp8 = {option: getattr(args, option) and precision == "w8a8-fp8" for option in FP8_OPTION_SUFFIXES}
        variant = {"precision": precision, "compile_mode": inductor_backend.COMPILE_MODES[precision != "bf16"],
                   "inductor_config": inductor_settings, "persistent_reductions_up_to": persistent, **fp8}
        if fp8["fused_fp8_mlp"]:
            variant["fp8_mlp_kernel"] = cublaslt_fp8.mlp_kernel(device)
            if variant["fp8_mlp_kernel"] == "cublaslt" and cublaslt_fp8.AUTOTUNE:  # its algorithm timed, not the first
                variant["cublaslt_autotune"] = True
        keys = [state_key(meta, {**variant, "sampler": s}) for s in (args.samplers if args.run else [None])]
        for key in keys if args.remeasure else []:
            (state / f"{key}.json").unlink(missing_ok=True)
        if all((state / f"{k}.json").is_file() for k in keys):
            continue
        engine_dir, _ = config_engines(args.model, model, precision, args.plan, work, [rows], **fp8)
        pipeline, load_s = load_ready(engine_dir, device == "cuda", rows, meta["cuda_graphs"])
        if variant.get("fp8_mlp_kernel") == "cublaslt" and cublaslt_fp8.FAILURE:  # the Triton kernel ran instead
            sys.exit(f"profile_step: cuBLASLt cannot run the fused MLP here: {cublaslt_fp8.FAILURE}")
        settings = {**variant, "load_s": load_s, "sitting": sitting}
        for key, sampler in zip(keys, args.samplers if args.run else [None]):
            if (state / f"{key}.json").is_file():
                continue
            if args.run:
                labels = torch.arange(args.images) % model.config.num_classes
                found = [{**settings, **profile_run(pipeline, labels, args.steps, sampler)}]
            else:
                found = [{**settings, **r} for r in profile_graphs(pipeline, rows, args.repeats)]
            if device == "cuda":
                found = [{**r, "triton_configs": autotuned_configs()} for r in found]
            write_json(state / f"{key}.json", {"rows": found})
        del pipeline
        torch.compiler.reset()
    prefix = f"{args.model}--*--{_slug(args.plan)}--{kind}{rows}"  # every variant the state holds: one table
    results = [r for f in sorted([*state.glob(f"{prefix}.json"), *state.glob(f"{prefix}-*.json")])
               for r in read_json(f)["rows"]]
    out = Path(args.results) / (f"profile-run-{card}-{args.model}-{_slug(args.plan)}.json" if args.run
                                else f"profile-step-{card}.json")
    write_json(out, {**meta, "groups": {g: p for g, p in GROUPS}, "rows": results})
    markdown = (run_markdown if args.run else step_markdown)(meta, results)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
