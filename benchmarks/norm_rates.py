"""The residual add + LayerNorm + adaLN modulation + FP8 quantize of DiT-XL/2's blocks (32 rows of 256 tokens, 1152
wide; issue 17): as Inductor compiles the model's expression for the FP8 engines (default, one-pass reductions
forced, coordinate-descent tuning), and as qandc's Triton kernel (`qandc::add_norm_modulate_fp8`, autotuned, then
each of its configs: rows a program, warps, a row as one 2048-wide block or as two, 1024 + 128), against a bf16 copy
of the same bytes (the memory's rate in practice). Median of `triton.testing.do_bench` (which flushes L2 between
calls) and of a CUDA graph's replays (`us_cuda_graph`: the engines' way, inputs left in L2 by the call before); GB/s
counts x and delta read, x' and the e4m3 written (7 bytes an element). Kernels called through Python (Inductor's,
the op's autotuned wrapper) are timed with their host time where launching is slower than the kernel (a 30 us
kernel: the op's wrapper read 28.5 us in one sitting and 64.4 in another), which the engines' CUDA graphs do not
pay: `autotuned_config` also gives the direct launch of the config autotuning chose. The kernel's outputs are
compared with the op's float32 computation (`quantized.add_norm_modulate_float32`, run here on the GPU). GPU only.

    python benchmarks/norm_rates.py --out benchmarks/results/norm-h200.json
"""

import argparse

import torch
import triton
import triton.testing

from qandc.artifacts import write_json
from qandc.errors import error_summary
from qandc.engines import triton_norm
from qandc.engines.quantized import add_norm_modulate_float32, to_fp8
from qandc.model.dit import modulate

BATCH, TOKENS, WIDTH, EPS = 32, 256, 1152, 1e-6


def model_expression(x, delta, gate, shift, scale, q_scale):
    """What the FP8 engines compute between two blocks' GEMMs, in the bf16 model's own terms."""
    x = x + gate.unsqueeze(1) * delta
    normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=EPS)
    return x, to_fp8(modulate(normed, shift, scale).reshape(-1, x.shape[-1]), q_scale)


def config_name(rows: int, split: bool, warps: int) -> str:
    """A kernel config's row name: rows a program, warps, and `_split` for a row as two blocks (1024 + 128)."""
    return f"triton_rows{rows}_warps{warps}" + ("_split" if split else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, delta = (torch.randn(BATCH, TOKENS, WIDTH, device="cuda").bfloat16() for _ in range(2))
    adaln = torch.randn(BATCH, 6 * WIDTH, device="cuda").bfloat16() * 0.1  # chunks of it, as the blocks take them
    shift, scale, gate = adaln[:, :WIDTH], adaln[:, WIDTH:2 * WIDTH], adaln[:, 2 * WIDTH:3 * WIDTH]
    q_scale = torch.tensor(0.02, device="cuda")
    inputs = (x, delta, gate, shift, scale, q_scale)
    elements = x.numel()
    source = torch.randn(elements * 7 // 4, device="cuda").bfloat16()  # read 3.5, written 3.5 bytes an element
    target = torch.empty_like(source)
    kernels = {"bf16_copy_same_bytes": lambda *_: target.copy_(source)}
    kernels["inductor_default"] = torch.compile(model_expression)
    kernels["inductor_coordinate_descent"] = torch.compile(model_expression,
                                                           options={"coordinate_descent_tuning": True})
    kernels["triton_autotuned"] = lambda *a: triton_norm.add_norm_modulate_fp8(*a, EPS)
    out_x, out_q = torch.empty_like(x), torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda")
    for config in triton_norm._add_norm_modulate_fp8_kernel.configs:
        rows, split, warps = config.kwargs["ROWS"], config.kwargs["SPLIT"], config.num_warps
        kernels[config_name(rows, split, warps)] = (
            lambda *a, rows=rows, split=split, warps=warps: triton_norm._add_norm_modulate_fp8_kernel.fn[
                (triton.cdiv(BATCH * TOKENS, rows),)](x, delta, gate, shift, scale, q_scale.reshape(1), out_x, out_q,
                                                     BATCH * TOKENS, WIDTH, TOKENS, shift.stride(0), EPS,
                                                     **triton_norm.blocks(WIDTH), ROWS=rows, SPLIT=split,
                                                     DEPENDENT=False, num_warps=warps))
    results = {}
    for name, fn in kernels.items():
        try:
            ms = triton.testing.do_bench(lambda: fn(*inputs), warmup=50, rep=200, return_mode="median")
        except Exception as e:  # a config this card cannot run: recorded, not fatal
            results[name] = {"error": error_summary(e)}
            continue
        results[name] = {"us": ms * 1e3, "gb_per_s": 7 * elements / (ms * 1e-3) / 1e9}
        try:  # replayed in a CUDA graph, as the engines run it: no host cost, and no L2 flush between calls
            results[name]["us_cuda_graph"] = triton.testing.do_bench_cudagraph(
                lambda: fn(*inputs), rep=200, return_mode="median") * 1e3
        except Exception as e:
            results[name]["cuda_graph_error"] = error_summary(e)
    want_x, want_q = add_norm_modulate_float32(*inputs, EPS)
    accuracy = {}
    for name in ("inductor_default", "triton_autotuned"):
        got_x, got_q = kernels[name](*inputs)
        accuracy[name] = {"x_equal_share": (got_x == want_x).float().mean().item(),
                          "q_equal_share": (got_q.float().reshape(want_q.shape) == want_q.float()).float().mean()
                          .item()}
    best = triton_norm._add_norm_modulate_fp8_kernel.best_config
    write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "shape_btc": [BATCH, TOKENS, WIDTH], "kernels": results, "accuracy": accuracy,
                          "autotuned_config": {**best.kwargs, "num_warps": best.num_warps,
                                               **results[config_name(best.kwargs["ROWS"], best.kwargs["SPLIT"],
                                                                     best.num_warps)]}})
    for name, r in results.items():
        print(f"{name:32s} " + (f"{r['us']:7.1f} us {r['gb_per_s']:7.0f} GB/s, in a CUDA graph "
                                 + (f"{r['us_cuda_graph']:7.1f} us" if "us_cuda_graph" in r else r["cuda_graph_error"])
                                 if "us" in r else r["error"]))
    for name, r in accuracy.items():
        print(f"{name:32s} x' equal {r['x_equal_share']:.4f}, e4m3 equal {r['q_equal_share']:.4f}")


if __name__ == "__main__":
    main()
