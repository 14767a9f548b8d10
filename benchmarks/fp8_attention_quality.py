"""What FP8 attention would cost in quality (issue 17), measured on the reference model before any engine is built on
it: FD of the float32 model, of its W8A8-FP8 recipe (fake quant, no cache, no VC), and of that recipe with each
attention computed as cuDNN's FP8 attention computes it (`benchmarks/fp8_attention.py` times it) — q, k and v
quantized to e4m3 by static per-tensor scales (each layer's amax over calibration runs / 448), the scores and the
softmax in float32, the unnormalised probabilities exp(s - max) quantized to e4m3 at scale 256 for the product with
v, then divided by their float32 sum; the output then goes to the projection's input quantizer as in the recipe.
The probabilities are taken against the row's final max, where cuDNN's online softmax quantizes each key block
against the running max (never larger): this errs, if at all, on the pessimistic side. Same seeds and labels in
every row (labels i % 10, sample i keyed by (seed, i)); `psnr_vs_fp8`: the FP8-attention images against the FP8
ones. The recipe and each row are kept in `--state`: a call cut short resumes there.

    python benchmarks/fp8_attention_quality.py --out benchmarks/results/fp8-attention-quality-h200.json
"""

import argparse
import math
import time
import types
from pathlib import Path

import numpy as np
import torch

from _common import generate_images
from qandc.artifacts import read_json, write_json
from qandc.calibration import CalibrationSettings, apply_recipe, calibrate
from qandc.engines.quantized import FP8_MAX, to_fp8
from qandc.metrics.evaluate import image_similarity, score
from qandc.model import load_checkpoint
from qandc.model.checkpoint import REFERENCE_CHECKPOINT
from qandc.model.dit import Attention, split_heads
from qandc.sampling import CachePlan

STEPS, P_SCALE = 50, 256.0


def fake_e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x through e4m3 at `scale` (x / scale clamped to ±448, rounded, times scale), in float32."""
    return to_fp8(x, scale).float() * scale


def fp8_attend(self: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """`Attention.attend` with the attention in FP8 (see the module's docstring); `self.fp8_scales`: q, k, v's."""
    q, k, v = (fake_e4m3(t, s) for t, s in zip(split_heads(qkv, self.num_heads), self.fp8_scales))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    unnormalised = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = fake_e4m3(unnormalised, 1 / P_SCALE) @ v / unnormalised.sum(dim=-1, keepdim=True)
    b, h, n, d = out.shape
    return self.proj(out.transpose(1, 2).reshape(b, n, h * d).to(qkv.dtype))


def calibrate_attention(model, images: int, batch: int, seed: int) -> dict:
    """Each attention's q, k, v amax over `images` sampling runs of `model` (all steps, guided), by module name:
    read from its qkv projection's outputs."""
    amax = {}

    def recorder(name: str, attn: Attention):
        def record(layer, inputs, qkv):
            found = torch.stack([t.abs().amax() for t in split_heads(qkv, attn.num_heads)]).float()
            amax[name] = torch.maximum(amax[name], found) if name in amax else found
        return record
    hooks = [m.qkv.register_forward_hook(recorder(name, m)) for name, m in model.named_modules()
             if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            generate_images(model, images, STEPS, "ddpm", CachePlan.none(), 1.5, seed, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="samples a row (default 10000)")
    parser.add_argument("--batch-size", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=800, help="the recipe's calibration samples (default 800)")
    parser.add_argument("--pool-samples", type=int, default=400)
    parser.add_argument("--attention-images", type=int, default=256,
                        help="sampling runs the q, k, v scales are calibrated on (other seeds than the rows')")
    parser.add_argument("--state", default="/tmp/qandc-fp8-attention")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the ablation's rows
    begin = time.time()
    fp_model = load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval()
    state = Path(args.state) / (f"n{args.n}-seed{args.seed}-budget{args.budget}-pool{args.pool_samples}"
                                f"-attention{args.attention_images}")
    recipe = state / "recipe-w8a8-fp8"
    if not (recipe / "recipe.json").exists():
        calibrate(fp_model, recipe, CalibrationSettings(
            preset="w8a8-fp8", budget=args.budget, plan=CachePlan.none(), pool_samples=args.pool_samples,
            steps=STEPS, seed=args.seed, vc="none", batch_size=max(1, args.batch_size // 4)), REFERENCE_CHECKPOINT)
    fp8_model = apply_recipe(load_checkpoint(REFERENCE_CHECKPOINT).to(device).eval(), recipe)[0]
    amax = calibrate_attention(fp8_model, args.attention_images, args.batch_size, args.seed + 1)
    rows, images = {}, {}
    for name in ("fp32", "w8a8-fp8", "w8a8-fp8+fp8-attention"):
        if (state / f"{name}.json").exists():  # a row of an earlier call (the device stops a command at 10 min)
            rows[name], images[name] = read_json(state / f"{name}.json"), np.load(state / f"{name}.npy")
            continue
        model = fp_model if name == "fp32" else fp8_model
        if name.endswith("fp8-attention"):
            for module_name, module in model.named_modules():
                if isinstance(module, Attention):
                    module.fp8_scales = amax[module_name] / FP8_MAX
                    module.attend = types.MethodType(fp8_attend, module)
        start = time.time()
        with torch.no_grad():
            images[name], labels = generate_images(model, args.n, STEPS, "ddpm", CachePlan.none(), 1.5, args.seed,
                                                   args.batch_size)
        rows[name] = {**score(images[name], labels, images["fp32"] if name != "fp32" else None),
                      "seconds": time.time() - start}
        np.save(state / f"{name}.npy", images[name])
        write_json(state / f"{name}.json", rows[name])
        print(name, {k: rows[name][k] for k in ("fd", "class_accuracy")}, flush=True)
    fd = rows["fp32"]["fd"]
    for row in rows.values():
        row["fd_ratio_to_fp32"] = None if fd is None or row["fd"] is None else row["fd"] / fd
    rows["w8a8-fp8+fp8-attention"]["psnr_vs_fp8"] = image_similarity(images["w8a8-fp8+fp8-attention"],
                                                                     images["w8a8-fp8"])["psnr"]
    write_json(args.out, {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "torch": torch.__version__, "n": args.n, "seed": args.seed, "steps": STEPS,
                          "sampler": "ddpm", "cfg_scale": 1.5, "recipe": {"preset": "w8a8-fp8", "budget": args.budget,
                                                                          "pool_samples": args.pool_samples,
                                                                          "vc": "none", "cache": "none"},
                          "attention_images": args.attention_images, "p_scale": P_SCALE,
                          "qkv_amax": {k: v.tolist() for k, v in amax.items()}, "rows": rows,
                          "seconds": time.time() - begin})
    for name, row in rows.items():
        print(f"{name:26s} FD {row['fd']}  x{row['fd_ratio_to_fp32']}  accuracy {row['class_accuracy']}")


if __name__ == "__main__":
    main()
