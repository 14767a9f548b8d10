"""`qandc bench`: every configuration side by side on one GPU, one run, the same seeds — DiT-XL/2 at 256² (random
weights, every layer non-zero: speed only) and the shipped reference model — from FP32 eager DDPM-250 (the paper's
baseline) to Q&C FP8 / INT8 + cache on Inductor engines with CUDA graphs, under the ablation's interval-3 plan and under
the shape of the plan the default search picks on the reference model (`default_plan_shape`; a search on random
weights would measure nothing). Beside them, the full-step peers on DiT-XL/2 (`step_peers.py`: torch.compile,
torchao FP8 / INT8, diffusers), each a stage of its own.

Each configuration is one stage whose result is written to the state folder as soon as it is measured; a rerun
skips finished stages, and `--budget-s` stops between stages so one call fits the GPU machine's 10-minute limit.
Engines and Inductor's compile cache live in the work folder (reused by a rerun on the same machine). Quantized
configurations use recipes calibrated here by ModelOpt (max) on a few forward passes of noise — enough for static
scales and for speed; their quality is the ablation's (full TAP calibration + VC), joined for the reference model.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_path, write_json
from .engines import cublaslt_fp8
from .errors import QandcError
from .sampling.plan import DEFAULT_PLAN_SEARCH, default_plan_shape
from .step_peers import PEER_STAGES, back_to_back_ms, compile_summary, measure_peer, median_ms, peer

BATCH, STEPS, CFG, SEED = 16, 50, 1.5, 0
CACHE_PLAN = "interval=3"  # the first ablation's plan: full step every 3rd, reuse all branches
DEFAULT_SHAPE = "default-shape"  # default_plan_shape(STEPS): the plan the default search picks, as a fixed shape
FLOOR = "fp8-floor"        # the stage measuring the FP8 floor of a full step


@dataclass(frozen=True)
class Config:
    name: str
    steps: int
    precision: str           # fp32 (eager model) | bf16 | w8a8-fp8 | w8a8-int8 (engines)
    cache: str = "none"
    compiled: bool = True    # engines: torch.compile + CUDA graphs; False: eager
    quality: str = ""        # the ablation / baseline row whose quality this configuration has
    fused_fp8: bool = False  # FP8 engines with FUSED_FP8's kernels

    @property
    def preset(self) -> str | None:
        return self.precision if self.precision.startswith("w8a8") else None


# build_inductor's FP8 options -> their mark in engine folder and state names
FP8_OPTION_SUFFIXES = {"fused_fp8_mlp": "-fusedmlp", "fused_fp8_norm": "-fusednorm", "fp8_fast_accum": "-fastaccum"}
# the fastest FP8 engines (issue 17), every option on: fc1 + GELU + quantize and each residual add + norm + quantize
# as fused kernels, GEMMs without float32 promotion. Their FD on the reference model is within the promoting engines'
# bootstrap interval (front-h200.json, targets' fp8_kernels: 0.98x of float32's at DDPM searched + forecast 0.4); the
# bench's quality columns still take the plain engines' ablation rows
FUSED_FP8 = dict.fromkeys(FP8_OPTION_SUFFIXES, True)


def fp8_suffix(options: dict) -> str:
    """The mark of build_inductor's FP8 `options` that are on, in engine folder and state names."""
    return "".join(suffix for option, suffix in FP8_OPTION_SUFFIXES.items() if options.get(option))


CONFIGS = [
    Config("fp32-eager-ddpm250", 250, "fp32", compiled=False, quality="baseline:ddpm-250"),
    Config("fp32-eager-50", STEPS, "fp32", compiled=False, quality="ablation:fp"),
    Config("bf16-eager-50", STEPS, "bf16", compiled=False, quality="ablation:fp"),
    Config("bf16-compiled-50", STEPS, "bf16", quality="ablation:fp"),
    Config("cache-only", STEPS, "bf16", CACHE_PLAN, quality="ablation:cache"),
    Config("fp8-only", STEPS, "w8a8-fp8", quality="ablation:quant-fp8"),
    Config("int8-only", STEPS, "w8a8-int8", quality="ablation:quant-int8"),
    Config("qc-fp8-cache", STEPS, "w8a8-fp8", CACHE_PLAN, quality="ablation:tap+vc@w8a8-fp8"),
    Config("qc-int8-cache", STEPS, "w8a8-int8", CACHE_PLAN, quality="ablation:tap+vc@w8a8-int8"),
    Config("cache-default", STEPS, "bf16", DEFAULT_SHAPE, quality="ablation:cache"),
    Config("qc-fp8-default", STEPS, "w8a8-fp8", DEFAULT_SHAPE, quality="ablation:tap+vc@w8a8-fp8"),
    Config("qc-int8-default", STEPS, "w8a8-int8", DEFAULT_SHAPE, quality="ablation:tap+vc@w8a8-int8"),
    Config("fp8-fused-only", STEPS, "w8a8-fp8", quality="ablation:quant-fp8", fused_fp8=True),
    Config("qc-fp8-fused-default", STEPS, "w8a8-fp8", DEFAULT_SHAPE, quality="ablation:tap+vc@w8a8-fp8",
           fused_fp8=True),
]
# candidates for best_qc
QC_CONFIGS = ("qc-fp8-cache", "qc-int8-cache", "qc-fp8-default", "qc-int8-default", "qc-fp8-fused-default")
MODELS = ("dit-xl-2", "reference")
PEERS_STAGE = "peers"      # names every peer stage (`peer-<name>`, qandc.step_peers)
PEER_MODELS = ("dit-xl-2",)  # the peers run at DiT-XL/2's shapes only
STAGES = tuple(c.name for c in CONFIGS) + (FLOOR,) + PEER_STAGES
STAGE_CHOICES = STAGES + (PEERS_STAGE,)


def config_plan(cache: str):
    """The CachePlan of a configuration's cache spec (DEFAULT_SHAPE: default_plan_shape(STEPS))."""
    from .sampling import CachePlan

    return default_plan_shape(STEPS) if cache == DEFAULT_SHAPE else CachePlan.parse(cache)


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name of `device` (default: this machine's current GPU), "cpu" on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def card_name(name: str | None = None) -> str:
    """A card's short name for result files: h100 or h200, else the name as a slug ("cpu" on the CPU); of the
    device `name`, or of this machine's current GPU."""
    name = (name or device_name()).lower()
    return next((c for c in ("h100", "h200") if c in name), re.sub(r"[^a-z0-9]+", "-", name).strip("-"))


def sitting() -> str:
    """This machine's boot (a fresh device machine boots anew): the bench's rows record it, so that a ratio between
    rows is read only between rows of one sitting (one run on one card)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return boot.read_text().strip() if boot.is_file() else socket.gethostname()


def _slug(cache: str) -> str:
    """A cache spec as part of a folder name."""
    return re.sub(r"[^A-Za-z0-9.]+", "", cache)


def make_model(name: str, device: str):
    """DiT-XL/2 with seeded random weights (no zero-init: zero adaLN / final layers would give zero amax and
    all-zero GEMMs that run faster than real ones), or the shipped reference checkpoint."""
    from .model import DiT, initialize_weights, load_checkpoint, named_config
    from .model.checkpoint import REFERENCE_CHECKPOINT

    if name == "reference":
        return load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
    model = DiT(named_config("DiT-XL/2"))
    return initialize_weights(model, seed=SEED, zero_init=False).to(device).eval()


def quick_recipe(model, preset: str, cache: str, folder: Path, batches: int = 4) -> Path:
    """A quant recipe whose static scales come from ModelOpt max calibration over `batches` forward passes of
    noise at timesteps spread over the schedule (for speed runs; not the full TAP calibration)."""
    import copy

    from .calibration.quantize import quantize, quantized_layers, save_amax
    from .formats.recipe import QuantRecipe

    if (folder / "amax.safetensors").is_file():
        return folder
    recipe = QuantRecipe(preset=preset, layers=quantized_layers(model), plan=config_plan(cache),
                         steps=STEPS, sampler="ddpm", cfg_scale=CFG, selector={"name": "noise", "batches": batches})
    c = model.config
    generator = torch.Generator().manual_seed(SEED)

    def forward_loop(m):
        for i in range(batches):
            x = torch.randn(BATCH * 2, c.in_channels, c.input_size, c.input_size, generator=generator)
            t = torch.full((BATCH * 2,), int(999 * (i + 0.5) / batches))
            y = torch.arange(BATCH * 2) % (c.num_classes + 1)
            with torch.no_grad():
                m(x.to(model.device), t.to(model.device), y.to(model.device))

    quantized = quantize(copy.deepcopy(model), recipe, forward_loop)
    folder.mkdir(parents=True, exist_ok=True)
    save_amax(quantized, folder)
    recipe.save(folder)
    return folder


def _step_times(denoiser, config, rows: int) -> tuple[float, float | None, float]:
    """Median ms of one call of the full and of the reuse graph at `rows` rows (guided batch), on their example
    feeds (fixed inputs), each call waited for; and of the full graph called back to back (`back_to_back_ms`)."""
    from .model.graphs import engine_graphs, example_feeds

    graphs = engine_graphs(config_plan(config.cache), denoiser.branch_names)
    feeds = example_feeds(denoiser, graphs, rows)

    def graph_ms(name: str, repeats: int) -> float:
        call = lambda: denoiser.forward_graph(graphs[name], feeds[name])  # noqa: E731
        for _ in range(3):
            call()
        return median_ms(call, repeats)

    ms_full = graph_ms("full", 20 if config.steps <= STEPS else 5)
    full_back_to_back = back_to_back_ms(lambda: denoiser.forward_graph(graphs["full"], feeds["full"]))
    return ms_full, None if config.cache == "none" else graph_ms("reuse", 50), full_back_to_back


def _memory_mark() -> int:
    """Reset the peak counter; return what is allocated now (held by earlier stages, not the one measured)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def config_engines(model_name: str, model, precision: str, cache: str, work: Path, batch_sizes,
                   **fp8_options: bool) -> tuple[Path, float | None]:
    """The Inductor engines of `model` (on the device they are for) at `precision` (bf16 or a W8A8 preset, with a
    `quick_recipe`; `fp8_options`: build_inductor's `fused_fp8_mlp`, `fused_fp8_norm`, `fp8_fast_accum`) under the
    cache spec `cache`, in `work` (shared by every configuration of that precision and plan): built unless already
    there, compiled for `batch_sizes`. The folder and the build's seconds (None: it was there)."""
    from .engines import build_inductor
    from .sampling import SamplerDefaults

    recipe = None
    if precision.startswith("w8a8"):
        recipe = quick_recipe(model, precision, cache, work / f"{model_name}-{precision}-{_slug(cache)}-recipe")
    engine_dir = work / f"{model_name}-{precision}-{_slug(cache)}{fp8_suffix(fp8_options)}-engines"
    if (engine_dir / "manifest.json").is_file():
        return engine_dir, None
    started = time.perf_counter()
    build_inductor(model, engine_dir, plan=config_plan(cache), recipe_dir=recipe,
                   sampler=SamplerDefaults(STEPS, "ddpm", CFG), batch_sizes=batch_sizes, **fp8_options)
    return engine_dir, time.perf_counter() - started


def load_ready(engine_dir: Path, compiled: bool, rows: int, cuda_graphs: bool | None = None):
    """`Pipeline.load(engine_dir)` and one call of each of its graphs at `rows` rows (compiling from Inductor's
    caches and capturing the CUDA graphs where `compiled`, unless `cuda_graphs` is False): the pipeline and the
    seconds until it was ready."""
    from .model.graphs import example_feeds
    from .runtime import Pipeline

    start = time.perf_counter()
    pipeline = Pipeline.load(engine_dir, compile=compiled, cuda_graphs=compiled if cuda_graphs is None else cuda_graphs)
    denoiser = pipeline.denoiser
    feeds = example_feeds(denoiser, denoiser.graphs, rows)  # runs the full graph
    for name, spec in denoiser.graphs.items():
        denoiser.forward_graph(spec, feeds[name])
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return pipeline, time.perf_counter() - start


def run_config(model_name: str, model, config: Config, work: Path, runs: int) -> dict:
    """Build what the configuration needs, load it twice (the second load after torch.compiler.reset(), from
    Inductor's caches), warm it up, then time whole sampling runs and single steps."""
    from .sampling import sample

    labels = torch.arange(BATCH) % model.config.num_classes
    plan = config_plan(config.cache)
    base = _memory_mark()
    build_s = load_s = reload_s = None
    model.to("cuda")
    if config.precision == "fp32":
        denoiser = model
        generate = lambda steps=config.steps: sample(model, labels, steps, "ddpm", CFG, seed=SEED,  # noqa: E731
                                                     plan=plan)
    else:
        engine_dir, build_s = config_engines(model_name, model, config.precision, config.cache, work, [2 * BATCH],
                                             **(FUSED_FP8 if config.fused_fp8 else {}))
        model.to("cpu")  # the peak memory below is the engines' alone
        pipeline, load_s = load_ready(engine_dir, config.compiled, 2 * BATCH)
        del pipeline
        torch.compiler.reset()
        base = _memory_mark()
        pipeline, reload_s = load_ready(engine_dir, config.compiled, 2 * BATCH)
        denoiser = pipeline.denoiser
        generate = lambda steps=config.steps: pipeline.generate(labels, SEED, steps=steps,  # noqa: E731
                                                                use_vc=False)
    torch.cuda.synchronize()
    # warm-up (compiles, captures the CUDA graphs); a short one for the long FP32 runs
    images = generate(5 if config.precision == "fp32" else config.steps)
    torch.cuda.synchronize()
    if not torch.isfinite(images).all():
        raise QandcError(f"{model_name} {config.name}: non-finite samples")
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        generate()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    calls = dict(getattr(denoiser, "calls", None) or {})  # the sampling runs' (the step timings call more)
    ms_full, ms_reuse, ms_full_back_to_back = _step_times(denoiser, config, 2 * BATCH)
    model.to("cpu")
    return {"name": config.name, "model": model_name, "steps": config.steps, "precision": config.precision,
            "cache": config.cache, "compiled": config.compiled, "fused_fp8": config.fused_fp8,
            **({"fp8_mlp_kernel": cublaslt_fp8.mlp_kernel("cuda")} if config.fused_fp8 else {}),
            "images_per_s": BATCH / statistics.median(seconds),
            "seconds_per_batch": statistics.median(seconds), "runs": runs, "ms_full_step": ms_full,
            "ms_full_step_back_to_back": ms_full_back_to_back,
            "ms_reuse_step": ms_reuse, "peak_mem_gb": peak, "quality_from": config.quality,
            "engine_calls": calls or None, "build_s": build_s, "load_s": load_s,
            "reload_s": reload_s, "device_name": torch.cuda.get_device_name(), "torch": torch.__version__}


def full_step_flops(model, rows: int) -> int:
    """FLOPs of one full step at `rows` rows (FlopCounterMode over the forward of a bf16 copy, on the model's
    device)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from .model.graphs import sample_inputs

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x, t, y = sample_inputs(model, rows)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bf16(x.to(torch.bfloat16), t, y)
    return counter.get_total_flops()


def fp8_floor(model, rows: int) -> dict:
    """FLOPs of one full step over the FP8 GEMM rate measured here (`torch._scaled_mm`, per-tensor scales, at the
    model's MLP shape)."""
    import triton.testing

    flops = full_step_flops(model, rows)
    c = model.config
    m, k, n = rows * (c.input_size // c.patch_size) ** 2, c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device="cuda")
    ms = triton.testing.do_bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,
                                                          out_dtype=torch.bfloat16), return_mode="median")
    rate = 2 * m * k * n / (ms * 1e-3)
    return {"flops_full_step": flops, "fp8_gemm_tflops": rate / 1e12, "gemm_shape": [m, k, n],
            "fp8_floor_ms": flops / rate * 1e3}


def _quality(config: Config, results_dir: Path) -> dict:
    """The FD and accuracy of the ablation (or baseline) row `config.quality` names, measured under the
    configuration's plan (an ablation row under another plan is not this configuration's quality)."""
    from .sampling import CachePlan

    source, _, row = config.quality.partition(":")
    name, _, preset = row.partition("@")
    path = results_dir / ("ablation.json" if source == "ablation" else "reference-model.json")
    if not path.is_file():
        return {}
    plan = config_plan(config.cache)
    for r in json.loads(path.read_text())["rows"]:
        row_plan = CachePlan.from_dict(r["plan"]) if "plan" in r else CachePlan.parse(r["cache"])
        if r["name"] == name and (not preset or r.get("preset") == preset) and row_plan == plan:
            return {"fd": r["fd"], "class_accuracy": r["class_accuracy"], "quality_n": r["n"]}
    return {}


def summarize(state: Path, card: str, results_dir: Path) -> dict:
    """The bench JSON from the finished stages: configs, the three headline ratios for the best Q&C configuration
    on DiT-XL/2, the FP8 floors."""
    configs = []
    for model_name in MODELS:
        for config in CONFIGS:
            path = state / f"{model_name}--{config.name}.json"
            if path.is_file():
                row = json.loads(path.read_text())
                if model_name == "reference":
                    row.update(_quality(config, results_dir))
                configs.append(row)
    floors = {m: json.loads((state / f"{m}--{FLOOR}.json").read_text())
              for m in MODELS if (state / f"{m}--{FLOOR}.json").is_file()}
    by_name = {(r["model"], r["name"]): r for r in configs}
    peers = [json.loads(path.read_text()) for path in (state / f"{m}--{s}.json" for m in PEER_MODELS
                                                        for s in PEER_STAGES) if path.is_file()]
    result = {"card": card, "device_name": sorted({r.get("device_name", "") for r in configs}),
              "torch": sorted({r.get("torch", "") for r in configs}), "batch": BATCH, "cfg_scale": CFG,
              "sampler": "ddpm", "seed": SEED,
              "cache_plan": CACHE_PLAN, "default_plan": default_plan_shape(STEPS).to_dict(),
              "default_plan_search": DEFAULT_PLAN_SEARCH,
              "notes": ["DiT-XL/2 256x256 (latent 32x32x4) with seeded random weights, every layer non-zero: "
                        "speed only, no quality", "images_per_s: batch of 16 labels with CFG (32 rows per step), "
                        "median of whole sampling runs after a warm-up run",
                        "quantized configurations: static scales from a quick ModelOpt max calibration; quality "
                        "columns (reference model) are the ablation's rows (TAP + VC recipes, 10k samples)",
                        "VC is not applied in the timed runs (one fused multiply-add per step)",
                        "*-default configurations: default_plan, the shape of the plan the default search "
                        "(default_plan_search) picks on the reference model (its compute fraction and forecast order, "
                        "full steps evenly spaced); their quality is the front's (front-<card>.json)",
                        "build_s: export, compile (autotune) and compile-cache save of the engines, when built in this "
                        "stage; load_s: Pipeline.load plus a first call of every graph (compile from the engines' "
                        "saved cache and Inductor's cache folder, CUDA graph capture), the stage's first load; "
                        "reload_s: the same after torch.compiler.reset()",
                        "peers: the same DiT-XL/2 weights and full-step inputs (32 rows) run by other stacks "
                        "(qandc.step_peers); compile_s: their first compile in the process, recompile_s: again after "
                        "torch.compiler.reset(); compile_report: that compile's graphs, graph breaks, FX graph "
                        "cache hits and graphs run without CUDA graphs (cudagraph_skips, with Inductor's reasons); "
                        "compile_phases: the first compile's longest phases (nested: seconds and calls)",
                        "sitting: the machine's boot a row was measured on; full_step_speedup_vs_best_peer compares "
                        "the fastest row with the peers of its sitting only (sittings: how many the rows span)",
                        "ms_full_step: one call at a time, each waited for (the host's launch included); "
                        "ms_full_step_back_to_back (and the *_back_to_back ratios): ten calls launched one after "
                        "another, per call — as a sampling run launches its steps and as the floor's GEMM is timed; "
                        "the back-to-back ratio takes the peer fastest back to back (best_peer_back_to_back)",
                        "fastest_full_step_over_fp8_floor: the fastest row against the floor of its sitting"],
              "fp8_floor": floors, "configs": configs, "peers": peers}
    fastest = min((r for r in configs if r["model"] == "dit-xl-2" and r.get("precision") != "fp32"
                   and r.get("compiled")), key=lambda r: r["ms_full_step"], default=None)
    # against the peers measured in the fastest row's sitting only; rows of other sittings are listed, not compared
    rivals = [r for r in peers if "ms_full_step" in r and fastest is not None
              and r.get("sitting") == fastest.get("sitting")]
    result["sittings"] = len({r.get("sitting") for r in [*configs, *peers, *floors.values()]})
    if rivals:
        best_peer = min(rivals, key=lambda r: r["ms_full_step"])
        result.update(fastest_full_step=fastest["name"], best_peer=best_peer["name"],
                      full_step_speedup_vs_best_peer=best_peer["ms_full_step"] / fastest["ms_full_step"])
        # back to back the order of the peers can differ (a peer's host launch hides behind its last call's work)
        timed = [r for r in rivals if "ms_full_step_back_to_back" in r]
        if timed and "ms_full_step_back_to_back" in fastest:
            best_peer = min(timed, key=lambda r: r["ms_full_step_back_to_back"])
            result.update(best_peer_back_to_back=best_peer["name"], full_step_speedup_vs_best_peer_back_to_back=
                          best_peer["ms_full_step_back_to_back"] / fastest["ms_full_step_back_to_back"])
    if fastest is not None and "dit-xl-2" in floors and fastest.get("sitting") == floors["dit-xl-2"].get("sitting"):
        # the fastest row against the floor read in its sitting
        result.update(_over_floor("fastest_full_step_over_fp8_floor", fastest, floors["dit-xl-2"]["fp8_floor_ms"]))
    best = max((by_name[("dit-xl-2", name)] for name in QC_CONFIGS if ("dit-xl-2", name) in by_name),
               key=lambda r: r["images_per_s"], default=None)
    if best is not None:
        result["best_qc"] = best["name"]
        for key, base in (("speedup_vs_bf16_compiled", "bf16-compiled-50"),
                          ("speedup_vs_fp32_ddpm250", "fp32-eager-ddpm250")):
            if ("dit-xl-2", base) in by_name:
                result[key] = best["images_per_s"] / by_name[("dit-xl-2", base)]["images_per_s"]
        if "dit-xl-2" in floors:
            result.update(_over_floor("full_step_over_fp8_floor", best, floors["dit-xl-2"]["fp8_floor_ms"]))
    return result


def _over_floor(key: str, row: dict, floor_ms: float) -> dict:
    """`key` (the row's full step over the FP8 floor) and, where the row has it, `key`_back_to_back."""
    ratios = {key: row["ms_full_step"] / floor_ms}
    if "ms_full_step_back_to_back" in row:
        ratios[f"{key}_back_to_back"] = row["ms_full_step_back_to_back"] / floor_ms
    return ratios


def plot(result: dict, path: Path) -> None:
    """Images/s against FD (reference model, quality from the ablation), DiT-XL/2 images/s per configuration and,
    with peers measured, DiT-XL/2 ms per full step of qandc's compiled engines and of the peers (FP8 floor and the
    back-to-back figures marked); a panel with nothing to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [r for r in result.get("peers", []) if "ms_full_step" in r]
    rows = sorted((r for r in result["configs"] if r["model"] == "reference" and "fd" in r),
                  key=lambda r: r["images_per_s"])
    xl = [r for r in result["configs"] if r["model"] == "dit-xl-2"]
    panels = [name for name, shown in (("quality", rows), ("speed", xl), ("step", peers)) if shown]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if rows:
        left = axes["quality"]
        markers = "osD^v<>pPX*h"  # points that nearly coincide stay apart by marker; names are in the legend
        for i, r in enumerate(rows):
            left.scatter(r["images_per_s"], r["fd"], marker=markers[i % len(markers)], s=60, color=f"C{i % 10}",
                         label=f"{r['name']}: {r['images_per_s']:.0f} img/s, FD {r['fd']:.2f}")
        left.legend(fontsize=8, loc="upper left", frameon=False)
        left.set(xscale="log", xlabel="images / s (batch 16, CFG)", ylabel="FD (classifier features, 10k; lower "
                 "is better)", title=f"Reference model: speed vs quality ({result['card']})")
        left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if xl:
        right = axes["speed"]
        bars = right.barh([r["name"] for r in xl], [r["images_per_s"] for r in xl])
        right.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
        right.set(xscale="log", xlabel="images / s (batch 16, CFG)", title=f"DiT-XL/2 256² ({result['card']}, "
                  "random weights)")
        right.set_xlim(right=right.get_xlim()[1] * 3)  # room for the last bar's value
    if peers:
        ax = axes["step"]
        steps = [r for r in xl if r.get("compiled") and r.get("precision") != "fp32"]
        names = [r["name"] for r in steps] + [f"peer: {r['name']}" for r in peers]
        bars = ax.barh(names, [r["ms_full_step"] for r in steps + peers],
                       color=["C0"] * len(steps) + ["C1"] * len(peers))
        ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
        back = [(n, r["ms_full_step_back_to_back"]) for n, r in zip(names, steps + peers)
                if "ms_full_step_back_to_back" in r]
        if back:
            ax.scatter([ms for _, ms in back], [n for n, _ in back], marker="|", s=400, color="k", zorder=3,
                       label="back to back (ten calls launched one after another)")
        floor = result["fp8_floor"].get("dit-xl-2", {}).get("fp8_floor_ms")
        if floor:
            ax.axvline(floor, color="k", linestyle="--", label=f"FP8 floor {floor:.2f} ms")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
        ax.set(xlabel="ms per full step (32 rows; bars: one call at a time, each waited for)",
               title=f"DiT-XL/2 full step: qandc vs peers ({result['card']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def pending_stages(models, only, state: Path) -> list[tuple[str, str]]:
    """(model, stage) of every stage of `only` not finished in `state`, model by model, the stages in the order
    `only` names them (PEERS_STAGE: every peer, there), so that a user spending a budget picks what runs first."""
    unknown = sorted(set(only) - set(STAGE_CHOICES))
    if unknown:
        raise QandcError(f"unknown bench stage {unknown[0]!r}; known: {', '.join(STAGE_CHOICES)}")
    stages = dict.fromkeys(s for name in only for s in (PEER_STAGES if name == PEERS_STAGE else (name,)))
    return [(m, name) for m in models for name in stages if (m in PEER_MODELS or name not in PEER_STAGES)
            and not _finished(state / f"{m}--{name}.json")]


def _finished(path: Path) -> bool:
    """A stage's row is in the state folder (a peer skipped for want of a library counts only without a GPU)."""
    return path.is_file() and not ("skipped" in json.loads(path.read_text()) and torch.cuda.is_available())


def _release() -> None:
    """Drop what a stage compiled (dynamo's cache holds the engines' weights) and the memory it held."""
    torch.compiler.reset()
    gc.collect()
    torch.cuda.empty_cache()


def bench(card: str, state: str | Path, work: str | Path, results_dir: str | Path, models=MODELS,
          budget_s: float = 540.0, runs: int = 3, only=STAGES) -> dict | None:
    """Run the unfinished stages of `only` (configuration names, FLOOR, peer stages or PEERS_STAGE for all of them),
    in that order, within `budget_s`; when they are done, write bench-<card>.json and its plot from every finished
    stage and return the result (None while stages remain). A peer row skipped for a missing library is tried again
    on a GPU."""
    state, work, results_dir = Path(state), Path(work), Path(results_dir)
    pending = pending_stages(models, only, state)
    if pending and not torch.cuda.is_available():
        raise QandcError("qandc bench measures GPU speed and needs a CUDA GPU (with every stage asked for done in "
                         "--state, it only rewrites the JSON and the plot)")
    state.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32 (the paper's baseline)
    torch.backends.cudnn.allow_tf32 = False
    configs = {c.name: c for c in CONFIGS}
    begin = time.perf_counter()
    for model_name in models:
        model = None
        for name in [name for m, name in pending if m == model_name]:
            if time.perf_counter() - begin > budget_s:
                print(f"budget of {budget_s:.0f} s spent: rerun to resume")
                return None
            print(f"{model_name:10s} {name:20s} started at {time.perf_counter() - begin:.0f} s", flush=True)
            model = model or make_model(model_name, "cpu")
            if name == FLOOR:
                floor = fp8_floor(model.to("cuda"), 2 * BATCH)
                write_json(state / f"{model_name}--{FLOOR}.json", {**floor, "sitting": sitting()})
                print(f"{model_name:10s} {name:20s} full {floor['fp8_floor_ms']:7.2f} ms "
                      f"({floor['fp8_gemm_tflops']:.1f} TFLOP/s at {'x'.join(map(str, floor['gemm_shape']))})",
                      flush=True)
                model.to("cpu")
                continue
            if name in PEER_STAGES:
                row = {**measure_peer(peer(name), model, 2 * BATCH, os.environ["TORCHINDUCTOR_CACHE_DIR"]),
                       "sitting": sitting()}
                write_json(state / f"{model_name}--{name}.json", row)
                unmeasured = row.get("skipped") or row.get("failed")
                print(f"{model_name:10s} {name:20s} " + (f"not measured: {unmeasured}" if unmeasured else
                      f"full {row['ms_full_step']:7.2f} ms ({row['ms_full_step_back_to_back']:.2f} back to back)  "
                      f"compile {row['compile_s']:.0f} s, again {row['recompile_s']:.0f} s  "
                      f"{compile_summary(row['compile_report'])}"), flush=True)
                _release()
                continue
            config = configs[name]
            started = time.perf_counter()
            row = run_config(model_name, model, config, work, runs=1 if config.precision == "fp32" else runs)
            row.update(stage_seconds=time.perf_counter() - started, sitting=sitting())
            write_json(state / f"{model_name}--{config.name}.json", row)
            print(f"{model_name:10s} {config.name:20s} {row['images_per_s']:9.2f} img/s  full "
                  f"{row['ms_full_step']:7.2f} ms ({row['ms_full_step_back_to_back']:.2f} back to back)  reuse "
                  f"{row['ms_reuse_step'] or 0:6.2f} ms  peak "
                  f"{row['peak_mem_gb']:5.1f} GB  ({row['stage_seconds']:.0f} s; load {row['load_s'] or 0:.0f} s, "
                  f"again {row['reload_s'] or 0:.0f} s)", flush=True)
            _release()
        del model
    result = summarize(state, card, results_dir)
    write_json(results_dir / f"bench-{card}.json", result)
    plot(result, results_dir / f"bench-{card}.png")
    return result
