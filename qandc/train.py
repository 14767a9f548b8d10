"""Training the Fashion-MNIST reference DiT: the original DiT recipe (adaLN-Zero, learned sigma, label dropout for
CFG, EMA, MSE + VLB loss, AdamW, uniform timesteps) at 4x16x16 (pixel-unshuffled 32x32) with patch size 1.

Runs in time-limited chunks (`--minutes`): each chunk resumes from `OUT/train.pt`, checkpoints atomically and
appends to `OUT/log.txt`, so a 10-minute command limit does not matter. `--export PATH` writes the EMA weights
(16-bit, original DiT format) with a sidecar JSON recording the architecture, guidance mode, data and training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_path, portable_command, portable_path
from .data import CLASSES, IMAGE_SIZE, PADDED_SIZE, UNSHUFFLE, images_to_model, load_fashion_mnist
from .errors import QandcError
from .model import DiT, DiTConfig, initialize_weights, save_checkpoint
from .model.checkpoint import torch_load
from .progress import progress
from .sampling import Diffusion, sample
from .values import argument, integer, output_file, output_folder, real

STATE_FILE = "train.pt"


def reference_config(hidden: int, depth: int, heads: int) -> DiTConfig:
    return DiTConfig(input_size=PADDED_SIZE // UNSHUFFLE, patch_size=1, in_channels=UNSHUFFLE ** 2,
                     hidden_size=hidden, depth=depth, num_heads=heads, num_classes=len(CLASSES), learn_sigma=True,
                     guidance="all", pixel_shuffle=UNSHUFFLE, image_crop=IMAGE_SIZE)


def _log(out: Path, line: str) -> None:
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def _save_state(path: Path, model, ema, opt, step: int, args) -> None:
    with atomic_path(path) as tmp:
        plain_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "config": model.config.to_dict(), "args": plain_args}, tmp)


def _read_state(path: Path) -> dict:
    state = torch_load(path)
    missing = [k for k in ("model", "ema", "opt", "step", "config") if k not in state]
    if missing:
        raise QandcError(f"{path}: not a training state (no {', '.join(missing)})")
    return state


def train(args, command: list[str]) -> None:
    """Train into `args.out` (resuming what it holds); `command`: the command line as typed, for the log and the
    exported sidecar."""
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = load_fashion_mnist("train", args.data_dir)
    images = torch.from_numpy(images).to(device)
    labels = torch.from_numpy(labels.astype(np.int64)).to(device)
    state_path = out / STATE_FILE
    state = _read_state(state_path) if state_path.exists() else None
    out.mkdir(parents=True, exist_ok=True)
    config = reference_config(args.hidden, args.depth, args.heads)
    model = initialize_weights(DiT(config), seed=args.seed).to(device)
    ema = DiT(config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    step = 0
    if state is not None:
        if DiTConfig.from_dict(state["config"]) != config:
            raise QandcError(f"{state_path}: holds a different architecture; use another --out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        _log(out, f"resumed at step {step}")
    _log(out, f"command: {portable_command(command, out)}")
    if not step:
        _log(out, f"config: {config.to_dict()} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
    diffusion = Diffusion(1000, learn_sigma=True)
    forward = torch.compile(model) if args.compile else model
    model.train()
    start, last_save, losses = time.time(), time.time(), []
    bar = progress(total=args.steps, initial=step, desc="training", unit="step")
    while step < args.steps and time.time() - start < args.minutes * 60:
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)  # resumable data order
        idx = torch.randint(0, len(images), (args.batch_size,), device=device, generator=g)
        batch = images[idx]
        flip = torch.rand(args.batch_size, device=device, generator=g) < 0.5
        batch = torch.where(flip[:, None, None], batch.flip(-1), batch)
        x0 = images_to_model(batch)
        y = torch.where(torch.rand(args.batch_size, device=device, generator=g) < args.label_dropout,
                        config.num_classes, labels[idx])
        t = torch.randint(0, 1000, (args.batch_size,), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model_out = forward(x_t, t, y)
        loss = diffusion.training_losses(model_out.float(), x0, x_t, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.detach())
        if step % args.log_every == 0:
            _log(out, f"step {step} loss {torch.stack(losses).mean().item():.4f} ({time.time() - start:.0f} s)")
            losses = []
        if time.time() - last_save > 300:
            _save_state(state_path, model, ema, opt, step, args)
            last_save = time.time()
    bar.close()
    _save_state(state_path, model, ema, opt, step, args)
    _log(out, f"saved step {step} after {time.time() - start:.0f} s in this chunk")
    ema.eval()
    grid_labels = torch.arange(10).repeat_interleave(10)
    print(f"sampling grid.png: {len(grid_labels)} images of the EMA weights, DDPM-50, CFG {args.grid_cfg:g}",
          file=sys.stderr)
    samples = sample(ema, grid_labels, 50, "ddpm", cfg_scale=args.grid_cfg, seed=0, progress=True)
    from .images import model_to_images, save_grid, to_uint8
    save_grid(to_uint8(model_to_images(samples, config)), out / "grid.png", columns=10)
    if args.export:
        ema16 = DiT(config)
        ema16.load_state_dict({k: v.cpu() for k, v in ema.state_dict().items()})
        ema16.half()
        record = {"classes": list(CLASSES),
                  "data": {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "split": "train (60k)",
                           "preprocess": "uint8/127.5-1, pad 28->32 with -1, random h-flip, pixel_unshuffle(2)"},
                  "training": {"command": portable_command(command, Path(args.export).parent),
                               "steps": step, "batch_size": args.batch_size,
                               "lr": args.lr, "ema_decay": args.ema_decay, "label_dropout": args.label_dropout,
                               "seed": args.seed, "bf16_autocast": device.type == "cuda",
                               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__},
                  "weights": "EMA, stored float16; load_checkpoint returns float32"}
        save_checkpoint(ema16, args.export, record)
        _log(out, f"exported EMA weights to {portable_path(args.export, out)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    count, fraction = argument(integer), argument(real, low=0, high=1)
    p.add_argument("--out", type=output_folder, required=True,
                   help="run directory: train.pt (resumed when present), log.txt, grid.png")
    p.add_argument("--minutes", type=argument(real, low=0), default=9.0,
                   help="stop this chunk after so many minutes (default 9)")
    p.add_argument("--steps", type=count, default=200_000, help="total training steps (default 200000)")
    p.add_argument("--batch-size", type=count, default=256, help="images per step")
    p.add_argument("--lr", type=argument(real, low=0, low_open=True), default=2e-4, help="AdamW learning rate")
    p.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay of the kept weights")
    p.add_argument("--label-dropout", type=fraction, default=0.1, help="null-class rate for CFG (default 0.1)")
    p.add_argument("--hidden", type=count, default=256, help="hidden size")
    p.add_argument("--depth", type=count, default=6, help="DiT blocks")
    p.add_argument("--heads", type=count, default=4, help="attention heads")
    p.add_argument("--seed", type=argument(integer, minimum=0), default=0, help="initialisation and data order seed")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--grid-cfg", type=argument(real), default=3.0, help="CFG scale of the sample grid (default 3)")
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--device", help="torch device (default cuda when available)")
    p.add_argument("--log-every", type=count, default=500, help="steps between log lines")
    p.add_argument("--export", type=output_file,
                   help="write the EMA weights here (16-bit, original DiT format + sidecar JSON)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m qandc.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    train(parser.parse_args(), ["python", "-m", "qandc.train", *sys.argv[1:]])
