"""The `qandc` command line. Expected failures print one line on stderr and exit 2; `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .artifacts import atomic_path, read_json, sha256_file, write_json
from .errors import QandcError
from .model.checkpoint import REFERENCE_CHECKPOINT

GRID_LIMIT = 256  # grid.png shows at most this many samples


def library_versions() -> dict:
    return {"qandc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT),
                   help="original DiT checkpoint (.pt) or diffusers DiTTransformer2DModel directory (default: the "
                        "shipped Fashion-MNIST reference model)")
    p.add_argument("--num-heads", type=int, help="attention heads, when the hidden size matches no named config")


def _add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["w8a8-int8", "w8a8-fp8", "w4a8"], default="w8a8-fp8")
    p.add_argument("--fp8-weight-per-channel", action="store_true", help="w8a8-fp8: per-output-channel weights")
    p.add_argument("--selector", choices=["tap", "uniform", "random", "kmeans"], default="tap")
    p.add_argument("--samples", type=int, default=800, help="calibration set size (default 800)")
    p.add_argument("--pool-samples", type=int, default=400,
                   help="trajectories in the pool; entries = trajectories x steps (default 400)")
    p.add_argument("--cache", default="interval=3",
                   help="cache plan, as for generate (default interval=3), or auto[:err=E|:reuse=F]: search one on "
                        "measured per-branch reuse errors (error budget E, default 0.1, or reuse fraction F); the "
                        "plan is kept in OUT/plan.json")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0, help="pool, selection and VC seed (default 0)")
    p.add_argument("--tap-m", type=int, default=3, help="TAP parallel subsamplings (default 3)")
    p.add_argument("--clusters", type=int, default=100, help="TAP / kmeans clusters (default 100)")
    p.add_argument("--alpha", type=float, default=0.5, help="TAP spatial vs temporal affinity weight (default 0.5)")
    p.add_argument("--tau", type=float, default=0.1, help="TAP temporal scale on t/1000 (default 0.1)")
    p.add_argument("--keep", nargs="*", default=[], help="fnmatch patterns of block Linears kept in high precision")
    p.add_argument("--vc", choices=["var", "nsr", "mse", "none"], default="var",
                   help="variance compensation: var (variance matching, default), nsr (noise-to-signal-weighted "
                        "least squares), mse (plain least squares) or none")
    p.add_argument("--vc-samples", type=int, default=256, help="trajectories VC is fitted on (default 256)")
    p.add_argument("--batch-size", type=int, default=256)


def _load_model(args):
    from .model import load_checkpoint

    return load_checkpoint(args.checkpoint, **({"num_heads": args.num_heads} if args.num_heads else {}))


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    from .images import decode_latents, has_image_space, model_to_images, save_grid, to_uint8
    from .model.checkpoint import read_sidecar
    from .sampling import CachePlan, sample, space_timesteps

    plan = CachePlan.parse(args.cache or "none")
    plan_source = f"--cache {args.cache or 'none'}"
    correction = None
    world, device = distributed.init(_device(args.device))  # first: engines built on "cuda" get this rank's GPU
    if args.engines:
        from .formats.recipe import vc_correction
        from .runtime import Pipeline

        if args.recipe or args.cache:
            raise QandcError("--engines carries its own recipe and cache plan: leave --recipe and --cache out")
        pipeline = Pipeline.load(args.engines, fallback=args.nan_fallback)
        model, plan = pipeline.denoiser, pipeline.plan
        plan_source = str(Path(args.engines) / "manifest.json")
        correction = None if args.no_vc else vc_correction(pipeline.vc, args.steps, plan_source,
                                                           model.config.in_channels)
    else:
        model = _load_model(args)
    if args.recipe:
        from .calibration import apply_recipe
        from .formats.recipe import RECIPE, VC, load_vc, vc_correction

        model, recipe = apply_recipe(model, args.recipe)
        if args.cache and plan != recipe.cache_plan:
            raise QandcError(f"--cache {args.cache} differs from the recipe's cache plan; leave --cache out")
        plan, plan_source = recipe.cache_plan, str(Path(args.recipe) / RECIPE)
        correction = None if args.no_vc else vc_correction(load_vc(args.recipe), args.steps,
                                                           Path(args.recipe) / VC, model.config.in_channels)
    labels = _generate_labels(args, model.config.num_classes)
    space_timesteps(1000, args.steps)
    _check_plan(plan, model, args.steps, plan_source)
    if args.batch_size < 1:
        raise QandcError(f"--batch-size must be positive, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise QandcError(f"{out}: exists and is not a directory")
    sources = _sources(args)
    if not args.engines:
        model.to(device)

    engine_steps = {"full": 0, "reuse": 0, "fallback_steps": 0}

    def shard(unit: dict) -> dict[str, np.ndarray]:
        start, stop = unit["ids"]
        if args.engines:  # the runtime: NaN guard and per-run step counts
            x = pipeline.generate(labels[start:stop], args.seed, args.steps, args.sampler, args.cfg_scale,
                                  sample_ids=range(start, stop), use_vc=not args.no_vc, progress=world.main,
                                  eta=args.eta)
            for path, count in pipeline.last_run.items():
                engine_steps[path] += count if isinstance(count, int) else len(count)
        else:
            x = sample(model, labels[start:stop], args.steps, args.sampler, args.cfg_scale, seed=args.seed,
                       plan=plan, eta=args.eta, correction=correction, sample_ids=range(start, stop),
                       progress=world.main)
            if not torch.isfinite(x).all():  # never write a black image silently
                bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
                raise QandcError(f"{bad} of the samples {start}..{stop - 1} are not finite (NaN / Inf): the model "
                                 f"{'with the recipe ' if args.recipe else ''}overflowed")
        return {"samples": x.cpu().numpy().astype(np.float32), "labels": labels[start:stop].numpy()}

    key = {"sources": sources, "model": model.config.to_dict(), "steps": args.steps, "sampler": args.sampler,
           "eta": args.eta, "cfg_scale": args.cfg_scale, "seed": args.seed, "plan": plan.to_dict(),
           "vc": correction is not None}
    starts = range(0, len(labels), args.batch_size)
    units = [{"ids": [start, min(start + args.batch_size, len(labels))],
              "labels": labels[start:start + args.batch_size].tolist()} for start in starts]
    world.barrier()  # every rank is loaded: the timing covers sampling alone
    started = time.perf_counter()
    files = distributed.run_shards(out / "shards", units, shard, world, key)
    seconds = time.perf_counter() - started
    world.close()
    if args.engines:
        print(f"engines (rank {world.rank}): {engine_steps['full']} full steps, {engine_steps['reuse']} reuse steps, "
              f"{engine_steps['fallback_steps']} recomputed by the float model (non-finite)", file=sys.stderr)
    if not world.main:
        return
    data = distributed.merge_shards(files, ("samples", "labels"))
    samples = torch.from_numpy(data["samples"])
    shown = samples[:GRID_LIMIT]
    images = None
    if args.vae:
        images = decode_latents(shown.to(device), args.vae).cpu()
    elif has_image_space(model.config):
        images = model_to_images(shown, model.config)
    with atomic_path(out / "samples.npz") as tmp:
        buffer = io.BytesIO()
        np.savez(buffer, samples=data["samples"], labels=data["labels"])
        tmp.write_bytes(buffer.getvalue())
    if images is not None:
        captions = None
        if args.per_class and args.per_class > 1:  # one row per requested label, captioned with its class name
            names = read_sidecar(args.checkpoint).get("classes") or []
            captions = [names[k] if k < len(names) else f"class {k}" for k in labels[::args.per_class].tolist()]
        save_grid(to_uint8(images), out / "grid.png", columns=args.per_class if captions else None,
                  captions=captions)
    write_json(out / "config.json", {
        "command": "generate", "checkpoint": None if args.engines else str(args.checkpoint),
        "checkpoint_sha256": sources.get("checkpoint"),
        "model": model.config.to_dict(), "guidance": model.config.guidance, "labels": labels.tolist(),
        "steps": args.steps, "sampler": args.sampler, "eta": args.eta, "cfg_scale": args.cfg_scale,
        "seed": args.seed, "plan": plan.to_dict(), "recipe": args.recipe, "engines": args.engines,
        "vc": correction is not None, "noise_keying": "per sample: generator keyed by (seed, index)",
        "vae": args.vae, "device": str(model.device), "world_size": world.size,
        "shards": {"folder": "shards", "count": len(units), "size": args.batch_size},
        "sampling_seconds": seconds, "engine_steps_rank0": engine_steps if args.engines else None,
        "versions": library_versions(),
    })
    if images is None:
        print(f"{model.config.in_channels}-channel latents saved to {out / 'samples.npz'}; no grid.png without --vae "
              "DIR", file=sys.stderr)
    elif len(samples) > GRID_LIMIT:
        print(f"grid.png shows the first {GRID_LIMIT} of {len(samples)} samples", file=sys.stderr)
    print(f"wrote {out}" + (f"; grid: {out / 'grid.png'}" if images is not None else ""))


def _generate_labels(args, num_classes: int) -> torch.Tensor:
    """--labels (default 0,1,2,3) each --per-class times in a row, or --num-images labels cycling over --labels
    (default every class)."""
    from .sampling import check_labels

    if args.num_images is not None:
        if args.per_class is not None:
            raise QandcError("--num-images and --per-class exclude each other")
        if args.num_images < 1:
            raise QandcError(f"--num-images must be positive, got {args.num_images}")
        cycle = check_labels(args.labels if args.labels is not None else range(num_classes), num_classes)
        return cycle[torch.arange(args.num_images) % len(cycle)]
    per_class = 1 if args.per_class is None else args.per_class
    if per_class < 1:
        raise QandcError(f"--per-class must be positive, got {per_class}")
    return check_labels([0, 1, 2, 3] if args.labels is None else args.labels, num_classes).repeat_interleave(per_class)


def _sources(args) -> dict:
    """sha256 of what the samples come from: the checkpoint (and the recipe's files), or the engines' manifest."""
    if args.engines:
        return {"engines": sha256_file(Path(args.engines) / "manifest.json")}
    sources = {"checkpoint": _checkpoint_hash(args.checkpoint)}
    if args.recipe:
        from .formats.recipe import AMAX, RECIPE, VC

        sources["recipe"] = {name: sha256_file(Path(args.recipe) / name) for name in (RECIPE, AMAX, VC)
                             if (Path(args.recipe) / name).is_file()}
    return sources


def cmd_calibrate(args) -> None:
    """Collect a calibration pool along cached trajectories, select the calibration set, quantize both paths with
    ModelOpt into a quant recipe, and fit VC factors. A rerun skips finished stages. Under torchrun the ranks share
    the pool collection (in shards, as generate's) and rank 0 alone does the rest."""
    from .calibration import calibrate

    model = _load_model(args)
    world, device = distributed.init(_device(args.device))
    if calibrate(model.to(device), args.out, _calibration_settings(args), _checkpoint_hash(args.checkpoint),
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

    model = _load_model(args)
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
    from .engines import build_engines

    manifest = build_engines(args.onnx, args.out, args.backend, args.max_batch, args.batch_sizes)
    print(f"{args.backend} engines: {', '.join(manifest.engines.values())}; wrote {args.out}")


def cmd_run(args) -> None:
    """The whole pipeline in one folder: calibrate -> export -> build-engine -> generate (through the engines) ->
    eval; each stage is skipped when its artifacts are there and valid."""
    from .run import run

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise QandcError("qandc run is one process; under torchrun, run calibrate and generate")
    model = _load_model(args).to(_device(None))
    settings = _calibration_settings(args)
    generate = ["--labels", ",".join(map(str, args.labels)), "--per-class", str(args.per_class), "--seed",
                str(args.seed)]
    result = run(model, args.out, settings, args.backend, args.checkpoint, generate)
    write_json(Path(args.out) / "eval.json", {"command": "run", **result, "versions": library_versions()})
    print(f"FD {result['fd']:.3f}  class accuracy {result['class_accuracy']:.4f}  (n={result['n']}); "
          f"wrote {args.out}")


def cmd_inspect(args) -> None:
    """Show what an artifact folder holds (export, engines, recipe, checkpoint sidecar), whether its checksums hold,
    and which engine backends can run on this machine."""
    from .engines import backend_names, get_backend
    from .formats.manifest import MANIFESTS

    folder = Path(args.dir)
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
        keys = {k: data[k] for k in ("kind", "format_version", "backend", "preset", "plan", "sampler", "steps",
                                     "lineage", "versions") if k in data}
        print(f"{name}: {json.dumps(keys)}")
        files = data.get("files", {})
        if not isinstance(files, dict):
            raise QandcError(f"{path}: 'files' is not an object of file names and checksums")
        for file, digest in files.items():
            state = "missing" if not (folder / file).is_file() else (
                "OK" if sha256_file(folder / file) == digest else "CHECKSUM MISMATCH")
            print(f"  {file}: {state}")
    if not found:
        raise QandcError(f"{folder}: holds no qandc artifact (manifest, recipe, pool, plan, config or eval JSON)")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    runnable = [n for n in backend_names() if get_backend(n).available() and here in get_backend(n).capabilities.devices]
    print(f"backends runnable here: {', '.join(runnable)}")


def cmd_train(args) -> None:
    """Train the Fashion-MNIST reference DiT with the original DiT recipe, in time-limited resumable chunks."""
    from .train import train

    train(args)


def cmd_bench(args) -> None:
    """Measure every configuration side by side on this GPU — DiT-XL/2 256² (random non-zero weights: speed only)
    and the reference model, batch 16 with CFG: FP32 eager DDPM-250 and 50 steps, bf16 eager, bf16 + torch.compile
    + CUDA graphs, cache only, FP8 only, INT8 only, Q&C FP8 / INT8 + cache (Inductor engines). Resumable: finished
    stages are kept in --state and skipped; --budget-s stops between stages. When every stage is done, writes
    bench-<card>.json and bench-<card>.png into --results."""
    import torch

    from .bench import MODELS, bench

    card = args.card
    if card is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        card = next((c for c in ("h100", "h200") if c in name.lower()), name.lower().replace(" ", "-"))
    result = bench(card, args.state, args.work, args.results, args.models or MODELS, args.budget_s, args.runs)
    if result is None:
        raise SystemExit(3)
    for key in ("speedup_vs_bf16_compiled", "speedup_vs_fp32_ddpm250", "full_step_over_fp8_floor"):
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
    result = evaluate(samples, args.reference)
    write_json(out, {"command": "eval", **result, "versions": {
        **library_versions(), "scipy": scipy.__version__, "scikit-image": skimage.__version__}})
    rows = [(key, result[key]) for key in ("n", "fd", "class_accuracy", "psnr", "ssim", "mse") if key in result]
    width = max(len(key) for key, _ in rows)
    print(f"{'metric':<{width}}  value")
    for key, value in rows:
        print(f"{key:<{width}}  {_table_cell(value)}")
    print(f"wrote {out}")


def _table_cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _checkpoint_hash(path: str) -> str:
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file()}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other expected failure."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .engines import backend_names

    parser = _Parser(
        prog="qandc", description="Post-training quantization plus feature caching (Q&C) for Diffusion Transformers.")
    parser.add_argument("--version", action="version", version=f"qandc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a randomly initialised DiT checkpoint",
                       description=cmd_init.__doc__)
    p.add_argument("--config", default="DiT-S/2", help="DiT paper config name, e.g. DiT-XL/2 (default DiT-S/2)")
    p.add_argument("--input-size", type=int, default=32, help="spatial size of the model input (default 32)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels (default 4, as latent DiTs)")
    p.add_argument("--num-classes", type=int, default=1000, help="number of classes (default 1000)")
    p.add_argument("--guidance", choices=["first3", "all"], default="first3",
                   help="CFG mode: first3 (original DiT) or all predicted-noise channels (diffusers)")
    p.add_argument("--nonzero", action="store_true",
                   help="random instead of zero adaLN and final layers, so outputs are not trivially zero")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--out", required=True, help="checkpoint path to write (a sidecar .json goes beside it)")
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
    p.add_argument("--steps", type=int, default=50, help="sampling steps, respaced from 1000 (default 50)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="default ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--cache", help="none (default) | interval=N[,branches=all|attn|mlp|NAME+NAME...][,regate=0|1] | "
                                  "PLAN.json; with --recipe, the recipe's plan")
    p.add_argument("--recipe", help="quant recipe directory from qandc calibrate: sample with fake quant (+ VC)")
    p.add_argument("--engines", help="engine directory from qandc build-engine: sample through the runtime")
    p.add_argument("--no-vc", action="store_true", help="with --recipe or --engines: do not apply the VC table")
    p.add_argument("--nan-fallback", action="store_true",
                   help="with --engines: check every step as it runs and recompute a step whose engine output holds "
                        "NaN / Inf with the float model of the engines' checkpoint (default: the run fails, naming "
                        "the steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="labels per batch and per shard file (default 64)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu; under torchrun "
                                    "cuda:LOCAL_RANK)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory to decode latents into images")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", help="pool, TAP selection, ModelOpt quantization and VC: a quant recipe",
                       description=cmd_calibrate.__doc__)
    _add_model_arguments(p)
    _add_calibration_arguments(p)
    p.add_argument("--report", action="store_true",
                   help="also write report.json and report.png: per-layer and per-step quantization error")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", required=True, help="output directory (a rerun resumes it)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="calibrate -> export -> build-engine -> generate -> eval, in one folder",
                       description=cmd_run.__doc__)
    _add_model_arguments(p)
    _add_calibration_arguments(p)
    p.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    p.add_argument("--labels", type=_int_list, default=list(range(10)), help="labels to generate (default 0..9)")
    p.add_argument("--per-class", type=int, default=4, help="samples per label (default 4)")
    p.add_argument("--out", required=True, help="output folder: recipe/, onnx/, engines/, samples/, eval.json")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="what an artifact folder holds; checksums; runnable backends",
                       description=cmd_inspect.__doc__)
    p.add_argument("dir", help="an export, engine, recipe or output folder")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="ONNX full and reuse graphs (+ Q/DQ from a recipe) and their manifest",
                       description=cmd_export.__doc__)
    _add_model_arguments(p)
    p.add_argument("--recipe", help="quant recipe directory from qandc calibrate (w8a8-int8 or w8a8-fp8)")
    p.add_argument("--cache", help="cache plan without a recipe (default none); with one, the recipe's")
    p.add_argument("--out", required=True, help="output directory: full.onnx, reuse.onnx, manifest.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engine", help="engines from an export: onnxruntime, tensorrt or inductor",
                       description=cmd_build_engine.__doc__)
    p.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    p.add_argument("--onnx", required=True, help="export directory from qandc export")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch of the TensorRT profile (default 64)")
    p.add_argument("--batch-sizes", type=_int_list, default=[],
                   help="inductor: rows (labels x 2 with guidance) to compile for at build time, e.g. 32,128; "
                        "others compile on first use")
    p.add_argument("--out", required=True, help="engine directory to write")
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
    p.add_argument("--state", default=".bench-state", help="finished stages (small JSON; default .bench-state)")
    p.add_argument("--work", default="/tmp/qandc-bench", help="engines, recipes and compile caches (large)")
    p.add_argument("--results", default="benchmarks/results", help="where bench-<card>.json / .png go")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="start no new stage after this many seconds; exit code 3 means rerun to resume")
    p.add_argument("--runs", type=int, default=3, help="timed sampling runs per configuration (median)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="score samples: FD, class accuracy, PSNR / SSIM / MSE",
                       description=cmd_eval.__doc__)
    p.add_argument("--samples", required=True,
                   help="qandc generate directory, .npz file with 'images' [and 'labels'], or folder of PNG files")
    p.add_argument("--reference", help="paired reference images (same forms, same count) for PSNR / SSIM / MSE")
    p.add_argument("--out", help="JSON to write (default: eval.json in the samples directory or beside the .npz)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QandcError as e:
        if args.debug:
            raise
        print(f"qandc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
