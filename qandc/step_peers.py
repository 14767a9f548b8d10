"""Full-step peers of qandc's engines in `qandc bench`: the same DiT (same weights), the same inputs (`sample_inputs`
at the bench's rows a step), run by other stacks at their best — torch.compile (max-autotune) on the bf16 module,
torchao's dynamic FP8 (per-tensor, per-row) and INT8 quantization plus compile, and diffusers'
`DiTTransformer2DModel` (converted by `to_diffusers`) plus compile. torchao quantizes the Linears that qandc's
recipes quantize (those inside the blocks). Each peer is a stage of its own (`peer-<name>`; `peers` names them all);
a peer whose library, GPU or GPU feature is missing becomes a row with `skipped` and the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .requires import PROVIDERS

PEER_COMPILE_MODE = "max-autotune"  # each peer at its best (torch's, torchao's and diffusers' advice)


@dataclass(frozen=True)
class Peer:
    name: str
    what: str
    library: str = ""        # the import name it needs beside torch
    torchao: str = ""        # the torchao config: fp8-tensor | fp8-row | int8
    diffusers: bool = False  # run diffusers' DiTTransformer2DModel instead of qandc's DiT
    fp8: bool = False        # needs FP8 tensor cores (compute capability 8.9+)


PEERS = (
    Peer("compile-bf16", f"torch.compile ({PEER_COMPILE_MODE}) on the same bf16 module"),
    Peer("torchao-fp8-tensor", "torchao FP8 dynamic activation + weight, per-tensor, + compile", "torchao",
         torchao="fp8-tensor", fp8=True),
    Peer("torchao-fp8-row", "torchao FP8 dynamic activation + weight, per-row, + compile", "torchao",
         torchao="fp8-row", fp8=True),
    Peer("torchao-int8", "torchao INT8 dynamic activation + weight (per-row), + compile", "torchao",
         torchao="int8"),
    Peer("diffusers-compile", "diffusers DiTTransformer2DModel (bf16) + compile", "diffusers", diffusers=True),
)
PEER_STAGES = tuple(f"peer-{p.name}" for p in PEERS)


def peer(stage: str) -> Peer:
    """The peer of a stage name (`peer-<name>`)."""
    return next(p for p in PEERS if f"peer-{p.name}" == stage)


def skip_reason(p: Peer, device: str) -> str | None:
    """Why this peer cannot run here (None: it can)."""
    if device != "cuda":
        return "needs a CUDA GPU"
    if p.library and importlib.util.find_spec(p.library) is None:
        return f"{p.library} is not installed: pip install {PROVIDERS[p.library][1]}"
    if p.fp8 and torch.cuda.get_device_capability() < (8, 9):
        return "FP8 GEMMs need compute capability 8.9 or newer"
    return None


def _is_block_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("blocks.")


def peer_module(p: Peer, model, device: str):
    """The peer's eager module on `device` in bf16 (quantized by torchao where it says) and its step function
    `step(module, x, t, y)` -> the model output."""
    import copy

    if p.diffusers:
        from .model.checkpoint import to_diffusers

        module = to_diffusers(model).to(device=device, dtype=torch.bfloat16)
        return module, lambda m, x, t, y: m(hidden_states=x, timestep=t, class_labels=y).sample
    module = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
    if p.torchao:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor, quantize_)

        config = {"fp8-tensor": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
                  "fp8-row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  "int8": lambda: Int8DynamicActivationInt8WeightConfig()}[p.torchao]()
        quantize_(module, config, filter_fn=_is_block_linear)
    return module, lambda m, x, t, y: m(x, t, y)


def step_inputs(model, rows: int, device: str):
    """The bench's full-step inputs: `sample_inputs` at `rows` rows, x in bf16."""
    from .model.graphs import sample_inputs

    x, t, y = sample_inputs(model, rows)
    return x.to(device, torch.bfloat16), t.to(device), y.to(device)


def _first_call_s(compiled, step, x, t, y) -> float:
    """Seconds of the first call of a compiled step (compile, autotune, CUDA graph recording)."""
    start = time.perf_counter()
    with torch.no_grad():
        step(compiled, x, t, y)
    torch.cuda.synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def kept_settings():
    """Restore Inductor's config and the float32 matmul precision on exit: torchao's `set_inductor_config` changes
    both (coordinate-descent tuning, TF32), which must not reach the bench's later stages."""
    inductor = torch._inductor.config.get_config_copy()
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch._inductor.config.load_config(inductor)
        torch.set_float32_matmul_precision(precision)


# where Inductor says why it runs a graph without CUDA graphs (torch._inductor.cudagraph_utils' "cudagraphs" artifact
# logger: it does not print unless TORCH_LOGS names it, but its warnings reach a handler of its own)
CUDAGRAPH_SKIP_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"


@contextlib.contextmanager
def compile_report():
    """Yield a dict that, on exit, says how torch.compile ran what was called inside: `graphs` compiled by Dynamo,
    `graph_breaks` (reason -> count), Inductor's FX graph cache hits, misses and bypasses (`fx_graph_cache`: a
    compile from the cache is fast), `cudagraph_skips` (graphs run without CUDA graphs) and the reasons Inductor
    logged for them (`cudagraph_skip_reasons`) — why a step's one call can be slower than its calls back to back."""
    from torch._dynamo.utils import counters

    from .engines.inductor_backend import fx_graph_cache_answers

    reasons: list[str] = []

    class Reasons(logging.Handler):
        def emit(self, record):
            reasons.append(record.getMessage())

    before = {key: dict(counters[key]) for key in ("stats", "graph_break", "inductor")}
    handler, logger = Reasons(logging.WARNING), logging.getLogger(CUDAGRAPH_SKIP_LOGGER)
    logger.addHandler(handler)
    report: dict = {}
    try:
        yield report
    finally:
        logger.removeHandler(handler)

        def added(key, name):
            return counters[key][name] - before[key].get(name, 0)

        report["graphs"] = added("stats", "unique_graphs")
        report["graph_breaks"] = {r: added("graph_break", r) for r in counters["graph_break"]
                                  if added("graph_break", r)}
        report["fx_graph_cache"] = fx_graph_cache_answers(before["inductor"])
        report["cudagraph_skips"] = added("inductor", "cudagraph_skips")
        report["cudagraph_skip_reasons"] = sorted(set(reasons))


@contextlib.contextmanager
def compile_phases(top: int = 12):
    """Yield a dict that, on exit, holds the `top` phases of torch.compile that took longest inside (name ->
    {"s": seconds, "calls": n}, from torch._dynamo.utils.compilation_time_metrics: Dynamo's tracing, AOT, Inductor's
    codegen, GEMM template autotuning and precompiling, Triton kernels' autotuning and coordinate-descent tuning at
    their first run). Phases nest (a phase's seconds include those within it) and only finished ones count. When
    the block is interrupted, it prints them first: where a compile longer than a device call went."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    before = {name: len(times) for name, times in metrics.items()}
    phases: dict = {}

    def fill():
        spent = {name: times[before.get(name, 0):] for name, times in metrics.items()}
        ranked = sorted(((sum(t), len(t), name) for name, t in spent.items() if t), reverse=True)[:top]
        phases.update({name: {"s": round(s, 1), "calls": n} for s, n, name in ranked})

    try:
        yield phases
    except BaseException:
        fill()
        print(f"stopped inside a compile; its finished phases: {phases_summary(phases)}", flush=True)
        raise
    fill()


def phases_summary(phases: dict) -> str:
    """One line of `compile_phases`: each phase's seconds and calls, longest first."""
    return ", ".join(f"{name} {p['s']:.1f} s ({p['calls']}x)" for name, p in phases.items()) or "none"


def compile_summary(report: dict) -> str:
    """One line of a `compile_report`: graphs, graph breaks, cache use, graphs without CUDA graphs and why."""
    why = "; ".join(report["cudagraph_skip_reasons"])
    cache = ", ".join(f"{n} {kind}" for kind, n in report["fx_graph_cache"].items() if n)
    return (f"{report['graphs']} graph(s), {sum(report['graph_breaks'].values())} break(s), "
            f"FX graph cache: {cache or 'not used'}, "
            f"{report['cudagraph_skips']} without CUDA graphs" + (f" ({why})" if why else ""))


def measure_peer(p: Peer, model, rows: int, inductor_cache: str | None = None) -> dict:
    """A bench row: the peer's median ms per full step at `rows` rows (CUDA events, after warm-up), its compile
    time in this process (`compile_s`; a cold compile only when `inductor_cache_was_empty`; where it went:
    `compile_phases`) and again after torch.compiler.reset() from Inductor's caches (`recompile_s`), how that
    compile ran (`compile_report`); `skipped` with the reason where it cannot run, `failed` with the error where it
    failed."""
    row = {"name": p.name, "what": p.what, "rows": rows, "compile_mode": PEER_COMPILE_MODE, "torch": torch.__version__}
    try:
        with kept_settings():
            return {**row, **_measure(p, model, rows, inductor_cache)}
    except Exception as e:  # a peer stack failing (import, quantization, compile) is a row, not the bench's end
        return {**row, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        torch.compiler.reset()


def median_ms(fn, repeats: int) -> float:
    """The median of `repeats` calls of `fn` on the GPU, in ms (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    """ms per call of `fn` called `calls` times one after another, the host queueing each while the device runs the
    last (as a sampling run launches its steps, and as the FP8 floor's GEMM is timed), median of `repeats`."""
    return median_ms(lambda: [fn() for _ in range(calls)], repeats) / calls


def _measure(p: Peer, model, rows: int, inductor_cache: str | None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = skip_reason(p, device)
    if reason:
        return {"skipped": reason}
    row = {}
    cache = Path(inductor_cache) if inductor_cache else None
    row["inductor_cache_was_empty"] = cache is None or not cache.is_dir() or not any(cache.iterdir())
    start = time.perf_counter()
    module, step = peer_module(p, model, device)
    row["prepare_s"] = time.perf_counter() - start  # conversion / quantization
    x, t, y = step_inputs(model, rows, device)
    with compile_phases() as phases:
        row["compile_s"] = _first_call_s(torch.compile(module, mode=PEER_COMPILE_MODE), step, x, t, y)
    row["compile_phases"] = phases
    torch.compiler.reset()
    compiled = torch.compile(module, mode=PEER_COMPILE_MODE)

    def call():
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step of Inductor's CUDA graph trees
        with torch.no_grad():
            return step(compiled, x, t, y)

    with compile_report() as report:  # of the compile that is timed, through the warm-up's CUDA graph recording
        row["recompile_s"] = _first_call_s(compiled, step, x, t, y)
        for _ in range(3):
            out = call()
    row["compile_report"] = report
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite output")
    row["ms_full_step"] = median_ms(call, 20)
    row["ms_full_step_back_to_back"] = back_to_back_ms(call)
    row["device_name"] = torch.cuda.get_device_name()
    row["versions"] = {p.library: importlib.import_module(p.library).__version__} if p.library else {}
    return row
