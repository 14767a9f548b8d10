"""The `qandc` command line. Expected failures print one line on stderr and exit 2; `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
from pathlib import Path

import torch

from . import __version__, chatter, distributed
from .artifacts import WRITE_ERRORS, library_versions, read_json, sha256_file, write_json
from .errors import QandcError
from .formats.lineage import confined, digest
from .formats.recipe import EXPORTABLE, PRESETS
from .locking import output_lock
from .model.checkpoint import REFERENCE_CHECKPOINT
from .requires import require_all
from .sampling import SamplerDefaults
from .sampling.plan import AUTO_GRAMMAR, DEFAULT_PLAN_SEARCH, GRAMMAR
from .staging import check_apart, check_file_apart
from .values import argument, integer, output_file, output_folder, real


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise QandcError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QandcError(f"--device {name}: no CUDA device is available")
    return device


SEED = argument(integer, minimum=0)
CFG_SCALE = argument(real)
STEPS = argument(integer, maximum=1000)  # sampling steps, respaced from the 1000 training steps
# what the stages import, checked before any work (qandc.requires names the extra that brings each)
RUN_GRAPHS_HELP = ("with engines on a GPU: sample each batch shape as one CUDA graph of the whole run (the engine "
                   "calls and the sampler's arithmetic between them) instead of one graph an engine call; the "
                   "first batch of a shape runs twice (warm-up, capture); not with --nan-fallback")
QUANTIZATION = ["modelopt.torch.quantization", "modelopt.torch.export"]
EXPORT = ["onnx", "polygraphy.backend.onnxrt", "onnxruntime"]


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT),
                   help="original DiT checkpoint (.pt), diffusers DiTTransformer2DModel directory or diffusers DiT "
                        "pipeline folder (its scheduler only checked) (default: the shipped Fashion-MNIST reference "
                        "model)")
    p.add_argument("--num-heads", type=argument(integer),
                   help="attention heads, when the hidden size matches no named config")


def _add_calibration_arguments(p: argparse.ArgumentParser, presets: tuple[str, ...] = PRESETS) -> None:
    p.add_argument("--preset", choices=presets, default="w8a8-fp8",
                   help="weight / activation formats of the block Linears" + (
                       "" if presets == PRESETS else " (w4a8 is fake quant only: calibrate's alone)"))
    p.add_argument("--fp8-weight-per-channel", action="store_true", help="w8a8-fp8: per-output-channel weights")
    p.add_argument("--selector", choices=["tap", "uniform", "random", "kmeans"], default="tap",
                   help="how the calibration set is picked from the pool")
    p.add_argument("--samples", type=int, default=800, help="calibration set size (default 800)")
    p.add_argument("--pool-samples", type=int, default=400,
                   help="trajectories in the pool; entries = trajectories x steps (default 400)")
    p.add_argument("--cache", default=DEFAULT_PLAN_SEARCH,
                   help=f"cache plan: a searched one, {AUTO_GRAMMAR} (default {DEFAULT_PLAN_SEARCH}: the plan of "
                        "least output error within that compute fraction, searched on this model's own "
                        "trajectories, so it fits any model; kept in OUT/plan.json), or a fixed one as for generate")
    p.add_argument("--steps", type=STEPS, default=50, help="sampling steps of the trajectories, respaced from 1000")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="sampler of the trajectories")
    p.add_argument("--cfg-scale", type=CFG_SCALE, default=1.5, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--seed", type=SEED, default=0, help="pool, selection and VC seed (default 0)")
    p.add_argument("--tap-m", type=argument(integer), default=3, help="TAP parallel subsamplings (default 3)")
    p.add_argument("--clusters", type=argument(integer), default=100, help="TAP / kmeans clusters (default 100)")
    p.add_argument("--alpha", type=argument(real, low=0, high=1), default=0.5,
                   help="TAP spatial vs temporal affinity weight (default 0.5)")
    p.add_argument("--tau", type=argument(real, low=0, low_open=True), default=0.1,
                   help="TAP temporal scale on t/1000 (default 0.1)")
    p.add_argument("--keep", nargs="*", default=[], help="fnmatch patterns of block Linears kept in high precision")
    p.add_argument("--vc", choices=["var", "nsr", "mse", "none"], default="var",
                   help="variance compensation: var (variance matching, default), nsr (noise-to-signal-weighted "
                        "least squares), mse (plain least squares) or none")
    p.add_argument("--vc-samples", type=int, default=256, help="trajectories VC is fitted on (default 256)")
    p.add_argument("--batch-size", type=int, default=256, help="trajectories per forward batch")


def _load_model(args, recipe_dir: str | None = None):
    """The --checkpoint's DiT; with a recipe calibrated on that checkpoint (its sha256 checked first), loaded with
    the model config the recipe records (heads included: neither a sidecar nor --num-heads is needed)."""
    from .formats.recipe import load_recipe_checkpoint
    from .model import load_checkpoint

    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    if recipe_dir:
        return load_recipe_checkpoint(recipe_dir, args.checkpoint, **overrides)
    return load_checkpoint(args.checkpoint, **overrides)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _count_list(text: str) -> list[int]:
    """Comma-separated positive integers."""
    count = argument(integer)
    return [count(v) for v in text.split(",") if v.strip()]


def _check_plan(plan, model, steps: int | None, source: str) -> None:
    """The cache plan fits the model's branches (and `steps`); an error names where the plan came from."""
    try:
        plan.reuse_set(model.branch_names)
        if steps is not None:
            plan.full_steps(steps)
    except QandcError as e:
        raise QandcError(f"{source}: {e}") from None


def cmd_init(args) -> None:
    """Write a randomly initialised DiT checkpoint (original format + sidecar)."""
    from .model import initialize_weights, named_config, save_checkpoint
    from .model.dit import DiT

    try:
        config = named_config(args.config, input_size=args.input_size, in_channels=args.in_channels,
                              num_classes=args.num_classes, guidance=args.guidance)
    except ValueError as e:
        raise QandcError(str(e)) from None
    model = initialize_weights(DiT(config), seed=args.seed, zero_init=not args.nonzero)
    record = {"init": {"config_name": args.config, "seed": args.seed, "nonzero": args.nonzero,
                       "note": "random weights: not a trained model"}}
    save_checkpoint(model, args.out, record)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")


def cmd_generate(args) -> None:
    """Sample images for the given labels and write grid.png, samples.npz and config.json. The samples are made in
    shards of --batch-size (kept in OUT/shards; a rerun skips finished ones); under torchrun the ranks share the
    shards and rank 0 merges them."""
    from .images import has_image_space
    from .model.checkpoint import pipeline_vae, read_sidecar
    from .runtime import GRID_LIMIT, SamplingOptions, generate
    from .sampling import CachePlan

    vae = args.vae or pipeline_vae(args.checkpoint)  # a diffusers pipeline folder's own VAE unless --vae is given
    require_all((QUANTIZATION if args.recipe else []) + (["diffusers"] if vae else []), "qandc generate")
    plan = CachePlan.parse(args.cache or "none")
    check_apart(args.out, {"--checkpoint": None if args.engines else args.checkpoint, "--recipe": args.recipe,
                           "--engines": args.engines, "--vae": args.vae,
                           "--cache": args.cache if args.cache and Path(args.cache).is_file() else None}, "samples")
    world, device = distributed.init(_device(args.device))  # first: engines built on "cuda" get this rank's GPU
    pipeline, plan_source, vc_source = _generate_pipeline(args, plan, device)
    labels = _generate_labels(args.labels, args.per_class, args.num_images, pipeline.config.num_classes)
    defaults = pipeline.sampler_defaults  # the recipe's or the engines' settings; the CLI's given ones win
    options = SamplingOptions(steps=defaults.steps if args.steps is None else args.steps,
                              sampler=args.sampler or defaults.sampler, eta=args.eta,
                              cfg_scale=defaults.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                              seed=args.seed, batch_size=args.batch_size, use_vc=not args.no_vc,
                              fixed_batch=args.fixed_batch)
    _check_plan(pipeline.plan, pipeline.denoiser, options.steps, plan_source)
    if options.use_vc:
        from .formats.recipe import vc_correction

        vc_correction(pipeline.vc, options.steps, vc_source, pipeline.config.in_channels)
    class_names = (read_sidecar(args.checkpoint).get("classes") or []) if (args.per_class or 1) > 1 else []
    if generate(pipeline, labels, args.out, options, provenance=_provenance(args), world=world, vae=vae and str(vae),
                per_class=args.per_class, class_names=class_names) is None:
        return  # not rank 0
    out = Path(args.out)
    if (out / "eval.json").is_file():  # eval's record of the samples this run replaced, if it is one
        from .metrics.evaluate import stale_note

        with contextlib.suppress(QandcError):
            if stale := stale_note(read_json(out / "eval.json"), out):
                print(f"note: {out / 'eval.json'} is {stale}", file=sys.stderr)
    grid = bool(vae) or has_image_space(pipeline.config)
    if not grid:
        print(f"{pipeline.config.in_channels}-channel latents saved to {out / 'samples.npz'}; no grid.png without "
              "--vae DIR", file=sys.stderr)
    elif len(labels) > GRID_LIMIT:
        print(f"grid.png shows the first {GRID_LIMIT} of {len(labels)} samples", file=sys.stderr)
    print(f"wrote {out}" + (f"; grid: {out / 'grid.png'}" if grid else ""))


def _generate_pipeline(args, plan, device):
    """What generate samples through — the engines, or the checkpoint's model on `device` with the cache plan or
    with the recipe's fake quant, plan and VC table — and the sources its plan and VC table are named by."""
    from .runtime import Pipeline

    if args.engines:
        if args.recipe or args.cache:
            raise QandcError("--engines carries its own recipe and cache plan: leave --recipe and --cache out")
        manifest = str(Path(args.engines) / "manifest.json")
        return (Pipeline.load(args.engines, fallback=args.nan_fallback, run_graphs=args.run_graphs), manifest,
                manifest)
    engines_only = [flag for flag, given in (("--nan-fallback", args.nan_fallback), ("--run-graphs", args.run_graphs))
                    if given]
    if engines_only or (args.no_vc and not args.recipe):
        raise QandcError(f"{(engines_only or ['--no-vc'])[0]} acts on "
                         f"{'--engines' if engines_only else '--recipe or --engines (their VC table)'}, not given")
    model = _load_model(args, args.recipe)
    if not args.recipe:
        return Pipeline.from_model(model.to(device), plan), f"--cache {args.cache or 'none'}", None
    from .formats.recipe import RECIPE, VC

    pipeline = Pipeline.from_recipe(model, args.recipe, not args.no_vc, device)
    if args.cache and plan != pipeline.plan:
        raise QandcError(f"--cache {args.cache} differs from the recipe's cache plan; leave --cache out")
    return pipeline, str(Path(args.recipe) / RECIPE), Path(args.recipe) / VC


MAX_IMAGES = 10 ** 7  # one command's samples (FD-50k takes 50k); config.json lists every label


def _generate_labels(labels: list[int] | None, per_class: int | None, num_images: int | None,
                     num_classes: int) -> torch.Tensor:
    """`labels` (default 0,1,2,3) each `per_class` times in a row, or `num_images` labels cycling over `labels`
    (default every class); at most MAX_IMAGES in all."""
    from .sampling import check_labels

    count = len(labels if labels is not None else range(4))
    total = num_images if num_images is not None else (per_class or 1) * count
    if total > MAX_IMAGES:
        asked = f"--num-images {total}" if num_images is not None else \
            f"--per-class {per_class} x {count} labels = {total} images"
        raise QandcError(f"{asked}: one command makes at most {MAX_IMAGES:,} (split the work over several --out "
                         "folders and --seed values)")

    if num_images is not None:
        if per_class is not None:
            raise QandcError("--num-images and --per-class exclude each other")
        if num_images < 1:
            raise QandcError(f"--num-images must be positive, got {num_images}")
        cycle = check_labels(labels if labels is not None else range(num_classes), num_classes)
        return cycle[torch.arange(num_images) % len(cycle)]
    per_class = 1 if per_class is None else per_class
    if per_class < 1:
        raise QandcError(f"--per-class must be positive, got {per_class}")
    return check_labels([0, 1, 2, 3] if labels is None else labels, num_classes).repeat_interleave(per_class)


def _provenance(args):
    """The paths and sha256 of what the samples come from: the checkpoint (and the recipe's files), or the engines'
    manifest."""
    from .runtime import Provenance

    if args.engines:
        return Provenance.of_engines(args.engines)
    sha256 = {"checkpoint": digest(args.checkpoint)}
    if args.recipe:
        from .formats.recipe import AMAX, RECIPE, VC

        sha256["recipe"] = {name: sha256_file(Path(args.recipe) / name) for name in (RECIPE, AMAX, VC)
                            if (Path(args.recipe) / name).is_file()}
    return Provenance(checkpoint=str(args.checkpoint), recipe=args.recipe, sha256=sha256)


def cmd_serve(args) -> None:
    """Serve an engine folder over HTTP (FastAPI + uvicorn): POST /v1/generate, GET /healthz, /readyz, /metrics.
    Concurrent requests with the same steps, sampler and guidance are batched (up to --max-batch images or
    --max-wait-ms), padded to batch-size buckets warmed at start (powers of two and, from 12, their midpoints);
    an image equals what qandc generate gives for the same seed, label and sample id. SIGINT / SIGTERM finish the
    accepted requests, then exit."""
    require_all(["fastapi", "uvicorn", "prometheus_client"] + (["diffusers"] if args.vae else []), "qandc serve")
    from .serve import ServeOptions, serve

    device = _device(args.device)
    if device.type == "cuda" and device.index is not None:  # the VAE (and the engines' process) on this device
        torch.cuda.set_device(device)
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                           max_images=args.max_images or args.max_batch, timeout_s=args.timeout_s,
                           max_body_bytes=args.max_body_kb * 1024, engine_processes=args.engine_processes)
    serve(args.engines, args.host, args.port, options, nan_fallback=args.nan_fallback, vae=args.vae, device=device,
          run_graphs=args.run_graphs)


def cmd_calibrate(args) -> None:
    """Collect a calibration pool along cached trajectories, select the calibration set, quantize both paths with
    ModelOpt into a quant recipe, and fit VC factors. A rerun skips finished stages. Under torchrun the ranks share
    the pool collection (in shards, as generate's) and rank 0 alone does the rest."""
    from .calibration import calibrate

    require_all(QUANTIZATION + (["matplotlib"] if args.report else []), "qandc calibrate")
    check_apart(args.out, {"--checkpoint": args.checkpoint}, "recipe")
    model = _load_model(args)
    world, device = distributed.init(_device(args.device))
    if calibrate(model.to(device), args.out, _calibration_settings(args), args.checkpoint,
                 report=args.report, world=world) is not None:
        print(f"wrote {args.out}")


def _calibration_settings(args):
    from .calibration import CalibrationSettings, SelectorParams

    return CalibrationSettings(
        preset=args.preset, selector=args.selector, budget=args.samples,
        plan=args.cache,
        pool_samples=args.pool_samples, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
        seed=args.seed, selector_params=SelectorParams(m=args.tap_m, k=args.clusters, alpha=args.alpha, tau=args.tau),
        keep=args.keep, fp8_weight_per_channel=args.fp8_weight_per_channel, vc=args.vc, vc_samples=args.vc_samples,
        batch_size=args.batch_size)


def cmd_export(args) -> None:
    """Export the full and the reuse graph to ONNX (Q/DQ nodes from --recipe) with the manifest build-engine
    reads. With a recipe, the cache plan, sampler settings and VC table come from it."""
    from .exporter import export
    from .sampling import CachePlan

    require_all(EXPORT + (QUANTIZATION if args.recipe else []), "qandc export")
    model = _load_model(args, args.recipe)
    plan = CachePlan.parse(args.cache) if args.cache else None
    if plan is not None:
        _check_plan(plan, model, None, f"--cache {args.cache}")
    manifest = export(model, args.out, plan, args.recipe, args.checkpoint)
    for name, info in manifest.checks.items():
        print(f"{manifest.onnx[name]}: {info['nodes']} nodes, {info['quantize_linear']} QuantizeLinear")
    print(f"wrote {args.out}")


def cmd_build_engine(args) -> None:
    """Build the full and reuse engines of an export directory — ONNX Runtime sessions, TensorRT plans, or
    Inductor engines (torch.export programs + saved compile cache; bf16 with real FP8 / INT8 kernels; built from
    the checkpoint and recipe the export names, on the GPU when there is one) — with a manifest carrying the cache
    plan, VC table, recipe id, sampler defaults and the sha256 of every file."""
    from .engines import build_engines, get_backend

    require_all(list(get_backend(args.backend).requires), "qandc build-engine")
    onnx = Path(args.onnx)
    manifest = build_engines(onnx.parent if onnx.is_file() else onnx, args.out, args.backend, args.max_batch,
                             args.batch_sizes)
    print(f"{args.backend} engines: {', '.join(manifest.engines.values())}; wrote {args.out}")


def cmd_run(args) -> None:
    """The whole pipeline in one folder: calibrate -> export -> build-engine -> generate (through the engines) ->
    eval; each stage is skipped when its artifacts are there and valid."""
    from .engines import get_backend
    from .run import run

    require_all(QUANTIZATION + EXPORT + list(get_backend(args.backend).requires), "qandc run")
    if distributed.torchrun_environment()[0] > 1:
        raise QandcError("qandc run is one process; under torchrun, run calibrate and generate")
    check_apart(args.out, {"--checkpoint": args.checkpoint}, "run")
    model = _load_model(args).to(_device(None))
    labels = _generate_labels(args.labels, args.per_class, None, model.config.num_classes)
    with output_lock(args.out, "run"):  # eval.json too
        result = run(model, args.out, _calibration_settings(args), args.backend, args.checkpoint, labels,
                     args.per_class)
        write_json(Path(args.out) / "eval.json", {"command": "run", **result, "versions": library_versions()})
    from .metrics.evaluate import fd_text

    print(f"class accuracy {result['class_accuracy']:.4f}  (n={result['n']}); {fd_text(result)}; wrote {args.out}")


RUN_STAGES = ("recipe", "onnx", "engines", "samples")  # qandc run's sub-folders, in stage order


def _inspect_artifact(folder: Path) -> bool:
    """Print what one artifact folder holds and whether its checksums hold; False when it holds no artifact."""
    from .formats.manifest import MANIFESTS
    from .metrics.evaluate import stale_note

    found = False
    for name in ("manifest.json", "recipe.json", "pool.json", "plan.json", "config.json", "eval.json"):
        path = folder / name
        if not path.is_file():
            continue
        found = True
        data = read_json(path)
        if name == "manifest.json":  # the one verifier, checksums left to the listing below
            kind = MANIFESTS.get(data["kind"]) if isinstance(data.get("kind"), str) else None
            if kind is None:
                raise QandcError(f"{path}: manifest kind {data.get('kind')!r} is none of {', '.join(MANIFESTS)}")
            data = kind.read(folder, verify=False).to_dict()
        keys = {k: data[k] for k in ("kind", "format_version", "backend", "preset", "plan", "plan_search", "sampler",
                                     "steps", "n", "fd", "class_accuracy", "psnr", "ssim", "lineage", "versions")
                if k in data}
        print(f"{name}: {json.dumps(keys)}")
        if name == "eval.json" and (stale := stale_note(data, folder)):
            print(f"  {stale}")
        files = data.get("files", {})
        if not isinstance(files, dict):
            raise QandcError(f"{path}: 'files' is not an object of file names and checksums")
        for file, sha in files.items():
            inside = confined(folder, file)
            state = "outside the folder: not read" if inside is None else "missing" if not inside.is_file() else (
                "OK" if sha256_file(inside) == sha else "CHECKSUM MISMATCH")
            print(f"  {file}: {state}")
    return found


def _inspect_run(folder: Path) -> None:
    """Print each stage of a qandc run folder in order, the evaluation's key numbers, and the stages missing."""
    from .metrics.evaluate import fd_text, stale_note

    missing = []
    for i, stage in enumerate(RUN_STAGES, 1):
        print(f"[{i}/5] {stage}/")
        if not (folder / stage).is_dir() or not _inspect_artifact(folder / stage):
            print("  missing")
            missing.append(f"{stage}/")
    print("[5/5] eval.json")
    if (folder / "eval.json").is_file():
        result = read_json(folder / "eval.json")
        try:
            print(f"  class accuracy {result['class_accuracy']:.4f}  (n={result['n']}); {fd_text(result)}")
            stale = stale_note(result, folder / "samples")
        except (KeyError, TypeError, ValueError):
            raise QandcError(f"{folder / 'eval.json'}: not an evaluation qandc run wrote") from None
        if stale:
            print(f"  {stale}")
    else:
        print("  missing")
        missing.append("eval.json")
    print(f"missing stages: {', '.join(missing)}" if missing else "every stage is there")


def cmd_inspect(args) -> None:
    """Show what an artifact folder holds (export, engines, recipe, pool, plan search, samples, eval), whether its
    checksums hold, and which engine backends can run on this machine; a qandc run folder is shown stage by stage."""
    from .engines import backend_names, get_backend

    folder = Path(args.dir)
    if not folder.is_dir():
        raise QandcError(f"{folder}: {'not a directory' if folder.exists() else 'no such directory'}")
    if any((folder / stage).is_dir() for stage in RUN_STAGES):
        _inspect_run(folder)
    elif not _inspect_artifact(folder):
        raise QandcError(f"{folder}: holds no qandc artifact (manifest, recipe, pool, plan, config or eval JSON)")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    runnable = [name for name in backend_names()
                if get_backend(name).available() and here in get_backend(name).capabilities.devices]
    print(f"backends runnable here: {', '.join(runnable)}")


def cmd_train(args) -> None:
    """Train the Fashion-MNIST reference DiT with the original DiT recipe, in time-limited resumable chunks."""
    from .train import train

    with output_lock(args.out, "train"):
        train(args, args.command_line)


def cmd_bench(args) -> None:
    """Measure every configuration side by side on this GPU — DiT-XL/2 256² (random non-zero weights: speed only)
    and the reference model, batch 16 with CFG: FP32 eager DDPM-250 and 50 steps, bf16 eager, bf16 + torch.compile
    + CUDA graphs, cache only, FP8 only, INT8 only, Q&C FP8 / INT8 + cache (Inductor engines), the cached ones under
    interval 3 and under the fixed plan the default plan search picks on the reference model (*-default), with each
    configuration's build, load and reload time; and the full-step peers on DiT-XL/2 (peer-*: torch.compile,
    torchao FP8 / INT8, diffusers). Resumable: finished stages are kept in --state and skipped; --budget-s stops
    between stages. When every stage asked for (--only) is done, writes bench-<card>.json and bench-<card>.png into
    --results."""
    import torch

    from .bench import MODELS, STAGES, bench, card_name

    card = args.card
    if card is None and torch.cuda.is_available():
        card = card_name()
    result = bench(card, args.state, args.work, args.results, args.models or MODELS, args.budget_s, args.runs,
                   args.only or STAGES)
    if result is None:
        raise SystemExit(3)
    for key in ("speedup_vs_bf16_compiled", "speedup_vs_fp32_ddpm250", "full_step_over_fp8_floor",
                "full_step_speedup_vs_best_peer"):
        if key in result:
            print(f"{key}: {result[key]:.2f}")
    print(f"wrote {Path(args.results) / f'bench-{card}.json'}")


def cmd_eval(args) -> None:
    """Score samples with the shipped reference classifier: FD against the Fashion-MNIST test set and class
    accuracy (when the samples carry labels), plus PSNR / SSIM / MSE against paired --reference images. --samples is
    a qandc generate directory, an .npz file with 'images' (and optional 'labels') or a folder of PNG files."""
    import scipy
    import skimage

    from .metrics.evaluate import evaluate

    samples = Path(args.samples)
    out = Path(args.out) if args.out else (samples if samples.is_dir() else samples.parent) / "eval.json"
    if out.is_dir():
        raise QandcError(f"--out {out}: is a directory")
    check_file_apart(out, {"--samples": samples, "--reference": args.reference})
    with output_lock(out.parent, "eval"):
        result = evaluate(samples, args.reference, record_in=out.parent)
        write_json(out, {"command": "eval", **result, "versions": {
            **library_versions(), "scipy": scipy.__version__, "scikit-image": skimage.__version__}})
    rows = [(key, result[key]) for key in ("n", "fd", "class_accuracy", "psnr", "ssim", "mse") if key in result]
    width = max(len(key) for key, _ in rows)
    print(f"{'metric':<{width}}  value")
    for key, value in rows:
        print(f"{key:<{width}}  {_table_cell(value)}")
    if result["fd_note"]:
        print(result["fd_note"])
    print(f"wrote {out}")


def _table_cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, "(default X)", unless the help already speaks of it; lines
    wrapped between words only (a cache spec or a stage name is never cut in two)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # not 0
        if "default" in text or not action.option_strings or none or action.default == []:
            return text
        return f"{text} (default %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other expected failure; defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": _HelpFormatter, **kwargs})

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_output_flags(p: argparse.ArgumentParser, subcommand: bool) -> None:
    """--debug and --verbose, accepted before the subcommand and after it (where an unset flag leaves the value
    given before it)."""
    unset = argparse.SUPPRESS if subcommand else False
    p.add_argument("--debug", action="store_true", default=unset,
                   help="show full tracebacks on errors (and the import error behind a missing dependency)")
    p.add_argument("--verbose", action="store_true", default=unset,
                   help="let third-party libraries speak (ModelOpt's notes, the ONNX tracer's warnings)")


def build_parser() -> argparse.ArgumentParser:
    from .bench import STAGE_CHOICES
    from .engines import backend_names

    parser = _Parser(
        prog="qandc", description="Post-training quantization plus feature caching (Q&C) for Diffusion Transformers.")
    parser.add_argument("--version", action="version", version=f"qandc {__version__}")
    _add_output_flags(parser, subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a randomly initialised DiT checkpoint",
                       description=cmd_init.__doc__)
    p.add_argument("--config", default="DiT-S/2", help="DiT paper config name, e.g. DiT-XL/2 (default DiT-S/2)")
    p.add_argument("--input-size", type=argument(integer), default=32,
                   help="spatial size of the model input (default 32)")
    p.add_argument("--in-channels", type=argument(integer), default=4,
                   help="input channels (default 4, as latent DiTs)")
    p.add_argument("--num-classes", type=argument(integer), default=1000, help="number of classes (default 1000)")
    p.add_argument("--guidance", choices=["first3", "all"], default="first3",
                   help="CFG mode: first3 (original DiT) or all predicted-noise channels (diffusers)")
    p.add_argument("--nonzero", action="store_true",
                   help="random instead of zero adaLN and final layers, so outputs are not trivially zero")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation seed (default 0)")
    p.add_argument("--out", type=output_file, required=True,
                   help="checkpoint path to write (a sidecar .json goes beside it)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="sample images from a DiT",
                       description=cmd_generate.__doc__ + " Sample i's noise is keyed by (seed, i).")
    _add_model_arguments(p)
    p.add_argument("--labels", type=_int_list,
                   help="comma-separated class labels (default 0,1,2,3; with --num-images every class)")
    p.add_argument("--per-class", type=int,
                   help="samples per label; above 1 the grid has one captioned row per label (default 1)")
    p.add_argument("--num-images", type=int,
                   help="N samples, labels cycling over --labels (for FD over many samples; not with --per-class)")
    plain = SamplerDefaults()
    made_for = "default: with --recipe or --engines, the {} it was made for, else {}"
    p.add_argument("--steps", type=STEPS, help="sampling steps, respaced from 1000 (" + made_for.format(
        "steps", plain.steps) + "; a VC table holds one step count: other steps need --no-vc)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"],
                   help="DDPM (ancestral) or DDIM (" + made_for.format("sampler", plain.sampler) + ")")
    p.add_argument("--eta", type=argument(real, low=0, high=1), default=0.0, help="DDIM eta, 0 to 1 (default 0)")
    p.add_argument("--cfg-scale", type=CFG_SCALE, help="classifier-free guidance scale; 1 = off (" + made_for.format(
        "scale", plain.cfg_scale) + ")")
    p.add_argument("--cache", help=f"{GRAMMAR} (default none; forecast=1|2 forecasts reused branch outputs from "
                                  "their last computations instead of reusing them); with --recipe, the recipe's "
                                  "plan (searched ones, --cache auto..., come from calibrate)")
    p.add_argument("--recipe", help="quant recipe directory from qandc calibrate: sample with fake quant (+ VC)")
    p.add_argument("--engines", help="engine directory from qandc build-engine: sample through the runtime")
    p.add_argument("--no-vc", action="store_true", help="with --recipe or --engines: do not apply the VC table")
    p.add_argument("--nan-fallback", action="store_true",
                   help="with --engines: check every step as it runs and recompute a step whose engine output holds "
                        "NaN / Inf with the float model of the engines' checkpoint (default: the run fails, naming "
                        "the steps)")
    p.add_argument("--run-graphs", action="store_true", help=RUN_GRAPHS_HELP)
    p.add_argument("--seed", type=SEED, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="labels per batch and per shard file (default 64)")
    p.add_argument("--fixed-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="run every batch at --batch-size (the last partial one padded, the padding dropped) and each "
                        "rank's first shard before the timed sampling, so no rank compiles or captures a CUDA graph "
                        "mid-run (default: on for engines that compile per batch size, Inductor on a GPU)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu; under torchrun "
                                    "cuda:LOCAL_RANK)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory to decode latents into images, scaled by "
                                 "its config's scaling_factor (default: --checkpoint's vae/ when it is a diffusers "
                                 "pipeline folder)")
    p.add_argument("--out", type=output_folder, required=True, help="output directory")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve engines over HTTP with dynamic batching", description=cmd_serve.__doc__)
    p.add_argument("engines", help="engine directory from qandc build-engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=argument(integer, minimum=0, maximum=65535), default=8000,
                   help="port to listen on (0: any free port, logged)")
    p.add_argument("--max-batch", type=argument(integer, minimum=1), default=16,
                   help="images per engine batch (guidance doubles its rows)")
    p.add_argument("--max-wait-ms", type=argument(real, low=0), default=10.0,
                   help="how long the oldest queued request waits for others to share its batch")
    p.add_argument("--max-queue", type=argument(integer, minimum=1), default=256,
                   help="images waiting at most; beyond, requests get 503 with Retry-After")
    p.add_argument("--max-images", type=argument(integer, minimum=1),
                   help="images per request at most (default --max-batch)")
    p.add_argument("--timeout-s", type=argument(real, low=0), default=60.0,
                   help="per request, queue and sampling: 504 after")
    p.add_argument("--max-body-kb", type=argument(integer, minimum=1), default=64, help="request body size limit")
    p.add_argument("--engine-processes", type=argument(integer, minimum=1), default=1,
                   help="processes loading the engines on the device, running batches side by side; without "
                        "NVIDIA MPS their CUDA contexts time-slice the GPU (2 halved the throughput on an H200)")
    p.add_argument("--nan-fallback", action="store_true",
                   help="recompute a step whose engine output holds NaN / Inf with the float model of the engines' "
                        "checkpoint (default: the requests whose samples are not finite fail with a 500)")
    p.add_argument("--run-graphs", action="store_true", help=RUN_GRAPHS_HELP)
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory: latents are decoded into PNG images "
                                 "(default: latent models answer in npz)")
    p.add_argument("--device", help="torch device the engines load on (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="pool, TAP selection, ModelOpt quantization and VC: a quant recipe",
                       description=cmd_calibrate.__doc__)
    _add_model_arguments(p)
    _add_calibration_arguments(p)
    p.add_argument("--report", action="store_true",
                   help="also write report.json and report.png: per-layer and per-step quantization error")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", type=output_folder, required=True, help="output directory (a rerun resumes it)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="calibrate -> export -> build-engine -> generate -> eval, in one folder",
                       description=cmd_run.__doc__)
    _add_model_arguments(p)
    _add_calibration_arguments(p, EXPORTABLE)  # run builds engines
    p.add_argument("--backend", choices=backend_names(), default="onnxruntime", help="engine backend")
    p.add_argument("--labels", type=_int_list, default=list(range(10)), help="labels to generate (default 0..9)")
    p.add_argument("--per-class", type=int, default=4, help="samples per label (default 4)")
    p.add_argument("--out", type=output_folder, required=True,
                   help="output folder: recipe/, onnx/, engines/, samples/, eval.json")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="what an artifact folder holds; checksums; runnable backends",
                       description=cmd_inspect.__doc__)
    p.add_argument("dir", help="an export, engine, recipe or output folder, or a qandc run folder")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="ONNX full and reuse graphs (+ Q/DQ from a recipe) and their manifest",
                       description=cmd_export.__doc__)
    _add_model_arguments(p)
    p.add_argument("--recipe", help="quant recipe directory from qandc calibrate (w8a8-int8 or w8a8-fp8)")
    p.add_argument("--cache", help="cache plan without a recipe (default none); with one, the recipe's")
    p.add_argument("--out", type=output_folder, required=True,
                   help="output directory: full.onnx, reuse.onnx, manifest.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engine", help="engines from an export: onnxruntime, tensorrt or inductor",
                       description=cmd_build_engine.__doc__)
    p.add_argument("--backend", choices=backend_names(), default="onnxruntime", help="engine backend")
    p.add_argument("--onnx", required=True, help="export directory from qandc export, or a file in it (full.onnx)")
    p.add_argument("--max-batch", type=argument(integer), default=64,
                   help="largest batch of the TensorRT profile (default 64)")
    p.add_argument("--batch-sizes", type=_count_list, default=[],
                   help="inductor: rows (labels x 2 with guidance) to compile for at build time, e.g. 32,128; "
                        "others compile on first use")
    p.add_argument("--out", type=output_folder, required=True, help="engine directory to write")
    p.set_defaults(func=cmd_build_engine)

    from .train import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="train the Fashion-MNIST reference DiT (resumable chunks)",
                       description=cmd_train.__doc__)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="GPU speed of every configuration side by side (resumable stages)",
                       description=cmd_bench.__doc__)
    p.add_argument("--card", help="card name in the result file (default: h100 / h200 from the device name)")
    p.add_argument("--models", type=lambda v: v.split(","), help="dit-xl-2,reference (default both)")
    p.add_argument("--state", type=output_folder, default=".bench-state",
                   help="finished stages (small JSON; default .bench-state)")
    p.add_argument("--work", type=output_folder, default="/tmp/qandc-bench",
                   help="engines, recipes and compile caches (large)")
    p.add_argument("--results", type=output_folder, default="benchmarks/results",
                   help="where bench-<card>.json / .png go")
    p.add_argument("--budget-s", type=argument(real, low=0), default=540.0,
                   help="start no new stage after this many seconds; exit code 3 means rerun to resume")
    p.add_argument("--runs", type=argument(integer), default=3, help="timed sampling runs per configuration (median)")
    p.add_argument("--only", nargs="+", choices=STAGE_CHOICES, metavar="STAGE",
                   help=f"run only these stages, in this order (default all: {', '.join(STAGE_CHOICES[:-1])}; "
                        "peers: every peer-*); the JSON and the plot are written from every stage finished in --state")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="score samples: FD, class accuracy, PSNR / SSIM / MSE",
                       description=cmd_eval.__doc__)
    p.add_argument("--samples", required=True,
                   help="qandc generate directory, .npz file with 'images' [and 'labels'], or folder of PNG files")
    p.add_argument("--reference", help="paired reference images (same forms, same count) for PSNR / SSIM / MSE")
    p.add_argument("--out", type=output_file,
                   help="JSON to write (default: eval.json in the samples directory or beside the .npz)")
    p.set_defaults(func=cmd_eval)
    for p in sub.choices.values():
        _add_output_flags(p, subcommand=True)
    return parser


def error_line(line: str) -> None:
    """`line` on stderr in one write: the ranks of a torchrun job share the stream, and print's separate write of
    the newline let two ranks' lines run into one (tests/test_hostile_concurrency.py, 1 run in 2)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run a command: 0 on success; 2 and one line for an expected failure (a bad input, a file that cannot be
    written); 130 and one line on Ctrl-C (every file written so far is whole: the same command resumes)."""
    args = build_parser().parse_args(argv)
    args.command_line = ["qandc", *(sys.argv[1:] if argv is None else argv)]  # as typed, for the records
    chatter.show(args.verbose)
    try:
        distributed.torchrun_environment()  # torchrun's variables, checked before any work
        args.func(args)
    except QandcError as e:
        if args.debug:
            raise
        error_line(f"qandc: error: {e}")
        return 2
    except OSError as e:  # a write outside atomic_path (which names its file) failed
        if args.debug or e.errno not in WRITE_ERRORS:
            raise
        error_line(f"qandc: error: {e.filename or 'writing'}: {e.strerror}")
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\nqandc: interrupted; the files written so far are whole, and the same command resumes",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
