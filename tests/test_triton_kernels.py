"""The Triton GEMMs against the PyTorch computations they stand for: `triton_fp8` (fc1, GELU (tanh) and the next
layer's FP8 quantize in one kernel) against `quantized.fp8_linear_gelu_quant` (the e4m3 rounding of the exact
result, tested in test_inductor.py), `triton_int8` against `quantized.int8_linear`'s integer arithmetic. On a GPU
the kernels themselves; without one, Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the mode is read
when kernels are defined) at fixed small blocks, since autotuning needs a GPU. The FP8 kernel's persistent TMA variant
too: the interpreter (Triton 3.9) runs host-side tensor descriptors, loads zero-filled and stores clipped past the
tensor's end as TMA does. All skip where Triton is not installed (the CPU CI's torch brings none), the
interpreter's where it cannot run a loop to a kernel argument (`interpreter`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import python_json

triton = pytest.importorskip("triton")

# a loop bound by a kernel argument, as every kernel here has one
INTERPRETER_PROBE = """
import triton, triton.language as tl, torch
@triton.jit
def count(out, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out, total)
out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
print(out.item())
"""


@pytest.fixture(scope="module")
def interpreter():
    """Skips the interpreter's tests where the installed Triton's interpreter cannot run a loop bound by a kernel
    argument (seen: Triton 3.6 under numpy 2.4, which refuses its one-element array as an index; 3.9 runs them)."""
    done = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    if done.returncode != 0 or done.stdout.split()[-1:] != ["3"]:
        reason = (done.stderr.strip().splitlines() or ["counted " + done.stdout.strip()])[-1]
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot loop to a kernel argument here: {reason}")

SHAPES = [(37, 256, 96), (5, 80, 40), (64, 1152, 128)]  # rows, K and N off the blocks' multiples: the masks
CASE = """
import json, sys, torch
from qandc.engines.quantized import fp8_linear_gelu_quant
m, k, n = {shape}
torch.manual_seed(m)
x = (torch.randn(m, k) * 4).to(torch.float8_e4m3fn)
w = (torch.randn(n, k) * 4).to(torch.float8_e4m3fn)
scale, bias, out_scale = torch.rand(n) * 1e-2, torch.randn(n).bfloat16(), torch.tensor(0.05)
want = fp8_linear_gelu_quant(x, w, scale, bias, out_scale).float()
"""
INTERPRETED = CASE + """
import triton
from qandc.engines import triton_fp8
got = torch.empty((m, n), dtype=torch.float8_e4m3fn)
blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)
grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
triton_fp8._fp8_gemm_gelu_quant_kernel.fn[grid](x, w, scale, bias, out_scale.reshape(1), got, m, n, k, **blocks,
                                                 PROMOTE={promote})
got = got.float()
"""
REPORT = """
step = torch.where(want.abs() < 2 ** -6, torch.full_like(want, 2 ** -9), 2 ** (torch.floor(torch.log2(want.abs())) - 3))
power = (want != 0) & (torch.log2(want.abs()) == torch.log2(want.abs()).round())
print(json.dumps({"shape": list(got.shape), "exact": (got == want).float().mean().item(),
                  "within_a_step": bool(((got - want).abs() <= step * 1.0001).all()),
                  "exact_but_interpreter_rounding": bool(((got == want) | (power & (got == want / 2))
                                                          | ((want.abs() <= 2 ** -6) & ((got - want).abs() <= 2 ** -8))
                                                          ).all())}))
"""
GPU = CASE + """
from qandc.engines.triton_fp8 import fp8_gemm_gelu_quant
got = fp8_gemm_gelu_quant(x.cuda(), w.cuda(), scale.cuda(), bias.cuda(), out_scale.cuda(), fast_accum={fast_accum},
                          tma={tma}).float().cpu()
magnitude = (x.float().abs() @ w.float().abs().t()) * scale / out_scale * 1.13
"""
GPU_REPORT = REPORT + """
print(json.dumps({"within_accumulation": bool(((got - want).abs() <= step * 1.0001 + magnitude * 2 ** -12).all())}))
"""


# K and N multiples of 16 (the descriptors' rows 16-byte aligned); rows, K and N off the blocks' multiples
TMA_SHAPES = [(37, 256, 256), (130, 256, 512), (5, 80, 48)]
TMA_INTERPRETED = CASE + """
import triton
from triton.tools.tensor_descriptor import TensorDescriptor
from qandc.engines import triton_fp8
got = torch.empty((m, n), dtype=torch.float8_e4m3fn)
subtile = {subtile}  # the epilogue in two halves: the output's block half as wide
a, b, c = (TensorDescriptor.from_tensor(t, block) for t, block in ((x, [16, 64]), (w, [32, 64]),
                                                                   (got, [16, 16 if subtile else 32])))
sms = 3  # fewer programs than tiles: each loops over several
grid = (min(sms, triton.cdiv(m, 16) * triton.cdiv(n, 32)),)
triton_fp8._fp8_gemm_gelu_quant_tma_kernel.fn[grid](a, b, c, scale, bias, out_scale.reshape(1), m, n, k, BLOCK_M=16,
                                                     BLOCK_N=32, BLOCK_K=64, GROUP_M=2, NUM_SMS=sms,
                                                     EPILOGUE_SUBTILE=subtile, PROMOTE={promote})
got = got.float()
"""


KERNELS = [("pointer", shape) for shape in SHAPES] + [("tma", shape) for shape in TMA_SHAPES]
INTERPRETED_KERNELS = KERNELS + [("tma-subtile", shape) for shape in TMA_SHAPES]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test runs the kernel itself")
@pytest.mark.parametrize("kernel, shape", INTERPRETED_KERNELS)
@pytest.mark.parametrize("promote", [True, False])
def test_the_kernel_computes_the_op_under_the_interpreter(kernel, shape, promote, interpreter):
    """Exact, but for the interpreter's own float32 → e4m3 conversion (Triton 3.9; seen on a plain load-convert-store
    kernel too): where rounding carries into the exponent it gives half the value (just below 2^n → 2^(n-1)), and
    subnormals (to 2^-6) land up to two of their steps (2^-9) off. The interpreter accumulates in float32 either way:
    what the promotion changes on a GPU is `benchmarks/gemm_rates.py`'s to measure. Both kernels: the pointer one and
    the persistent TMA one (several tiles a program), its epilogue whole and in two halves."""
    code = INTERPRETED if kernel == "pointer" else TMA_INTERPRETED
    result = python_json(code.format(shape=shape, promote=promote, subtile=kernel == "tma-subtile") + REPORT,
                   {"TRITON_INTERPRET": "1"})
    assert result["shape"] == [shape[0], shape[2]] and result["exact_but_interpreter_rounding"]
    assert result["exact"] > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel, shape", KERNELS)
@pytest.mark.parametrize("fast_accum", [False, True])
def test_the_kernel_computes_the_op_on_the_gpu(kernel, shape, fast_accum):
    """Within one e4m3 step of the exact result, plus what Hopper's FP8 tensor cores lose accumulating: they keep ~14
    bits of a running sum between float32 promotions. Seen on the H200 against the one-step bound alone: at K = 80
    1.5% of outputs off, at K = 256 some beyond a step, with the promotion every K block and without. So the bound
    adds 2^-12 of the sum of the products' magnitudes (times GELU's largest slope, 1.13) to the step; exact for
    nearly all outputs, with the promotion and without (`fast_accum`). The pointer kernel passed at all three shapes
    on the H200, with it (gpu-logs/kernels-h200-session7.log) and both ways (gpu-logs/kernels-h200-session10.log);
    the TMA kernel (`fp8_gemm_gelu_quant(..., tma=True)`, autotuned) at its three, both ways
    (gpu-logs/kernels-h200-session13.log)."""
    code = GPU.format(shape=shape, fast_accum=fast_accum, tma=kernel == "tma") + GPU_REPORT
    result, accumulation = python_json(code, {}, lines=2)
    assert result["shape"] == [shape[0], shape[2]] and accumulation["within_accumulation"] and result["exact"] > 0.97


CUBLASLT = CASE + """
from qandc.engines import cublaslt_fp8
cublaslt_fp8.AUTOTUNE = {autotune}
tensorwise = scale.mean()
want = fp8_linear_gelu_quant(x, w, tensorwise.expand(n).contiguous(), bias, out_scale).float()
args = [x.cuda(), w.cuda(), tensorwise.cuda(), bias.cuda(), (1 / out_scale).cuda()]
assert cublaslt_fp8.usable(args[0], args[1])
got = cublaslt_fp8.fp8_gemm_gelu_quant(*args, fast_accum={fast_accum})
other = (torch.randn(m, k) * 4).to(torch.float8_e4m3fn).cuda()
eager = cublaslt_fp8.fp8_gemm_gelu_quant(other, *args[1:], fast_accum={fast_accum})
static, graph = args[0].clone(), torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    replayed = cublaslt_fp8.fp8_gemm_gelu_quant(static, *args[1:], fast_accum={fast_accum})
static.copy_(other)
graph.replay()
replay = {{"replay_equal": torch.equal(replayed.float(), eager.float())}}
got = got.float().cpu()
magnitude = (x.float().abs() @ w.float().abs().t()) * tensorwise / out_scale * 1.13
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(48, 256, 256), (160, 256, 512), (16, 80, 48)])  # cuBLASLt's FP8: multiples of 16
@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("autotune", [False, True])
def test_cublaslt_computes_the_op_on_the_gpu_and_replays_in_a_cuda_graph(shape, fast_accum, autotune):
    """`cublaslt_fp8.fp8_gemm_gelu_quant` (nvmath-python's cuBLASLt FP8 GEMM with the GELU + bias epilogue, a
    tensor-wide weight scale) against the op's exact rounding, within the Triton kernel's bound; and captured in a
    CUDA graph, then replayed on other inputs copied into the captured one, it gives what an eager call on them
    gives (its operands rebound by pointer, its plan made before the capture); the heuristic's algorithm and the
    fastest of its candidates alike."""
    pytest.importorskip("nvmath")
    code = (CUBLASLT.format(shape=shape, fast_accum=fast_accum, autotune=autotune) + GPU_REPORT
            + "print(json.dumps(replay))\n")
    result, accumulation, replay = python_json(code, {}, lines=3)
    assert result["shape"] == [shape[0], shape[2]] and accumulation["within_accumulation"] and result["exact"] > 0.9
    assert replay["replay_equal"]


REFUSED = CASE + """
from qandc.engines import cublaslt_fp8
tensorwise = scale.mean().expand(n).contiguous()
args = [t.cuda() for t in (x, w, tensorwise, bias, out_scale, 1 / out_scale)]
got = torch.ops.qandc.fp8_linear_gelu_quant_tensorwise(*args)
print(json.dumps({{"usable": cublaslt_fp8.usable(args[0], args[1]), "failure": cublaslt_fp8.FAILURE,
                   "as_triton": torch.equal(got.float(), fp8_linear_gelu_quant(*args[:5]).float())}}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_cublaslt_refuses_take_the_triton_kernel_without_disabling_cublaslt():
    """37 rows (not a multiple of 16: cuBLASLt's FP8 refuses them) go to the Triton kernel before cuBLASLt is asked,
    so its refusal does not turn cuBLASLt off for the shapes it runs."""
    pytest.importorskip("nvmath")
    result = python_json(REFUSED.format(shape=(37, 256, 256)), {})
    assert result == {"usable": False, "failure": None, "as_triton": True}


NORM = """
import json, torch, triton
from qandc.engines.quantized import add_norm_modulate_float32, add_norm_modulate_fp8
from qandc.engines import triton_norm
b, t, c = {shape}
torch.manual_seed(c)
x, delta = torch.randn(b, t, c).bfloat16(), torch.randn(b, t, c).bfloat16()
adaln = (torch.randn(b, 6 * c) * 0.3).bfloat16()  # chunks of it, as the blocks take them
shift, scale, gate, q_scale = adaln[:, :c], adaln[:, c:2 * c], adaln[:, 2 * c:3 * c], torch.tensor(0.02)
want_x, want = add_norm_modulate_fp8(x, delta, gate, shift, scale, q_scale, 1e-6)
want_x, want = want_x.float(), want.float()
"""
NORM_INTERPRETED = NORM + """
got_x, got = torch.empty_like(x), torch.empty(x.shape, dtype=torch.float8_e4m3fn)
triton_norm._add_norm_modulate_fp8_kernel.fn[(triton.cdiv(b * t, 2),)](
    x, delta, gate, shift, scale, q_scale.reshape(1), got_x, got, b * t, c, t, shift.stride(0), 1e-6,
    **triton_norm.blocks(c), ROWS=2, SPLIT={split}, DEPENDENT=False)
"""
NORM_GPU = NORM + """
got_x, got = triton_norm.add_norm_modulate_fp8(x.cuda(), delta.cuda(), gate.cuda(), shift.cuda(), scale.cuda(),
                                               q_scale.cuda(), 1e-6)
"""
NORM_REPORT = """
got_x, got = got_x.float().cpu(), got.float().cpu()
# the e4m3 of the kernel's own residual stream (nothing added to it): the interpreter's bf16 truncation then moves
# nothing downstream
own = add_norm_modulate_float32(got_x.bfloat16(), torch.zeros_like(delta), gate, shift, scale, q_scale, 1e-6)[1]
own = own.float()
power = (own != 0) & (torch.log2(own.abs()) == torch.log2(own.abs()).round())
print(json.dumps({"x_within_bf16_step": bool(((got_x - want_x).abs() <= want_x.abs() * 2 ** -7).all()),
                  "x_exact": (got_x == want_x).float().mean().item(), "exact": (got == want).float().mean().item(),
                  "own_exact_but_interpreter_rounding": (((got == own) | (power & (got == own / 2))).float().mean()
                                                         .item())}))
"""
NORM_SHAPES = [(3, 5, 48), (2, 7, 1152)]  # rows off the programs' multiples; DiT-XL/2's width (1152 of a 2048 block)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test runs the kernel itself")
@pytest.mark.parametrize("shape", NORM_SHAPES + [(2, 3, 256)])
@pytest.mark.parametrize("split", [False, True])
def test_the_norm_kernel_computes_the_op_under_the_interpreter(shape, split, interpreter):
    """The residual add within a bf16 step (the interpreter truncates to bf16 where the GPU rounds: about half the
    values a step below), and the e4m3 input of the next GEMM what the op's float32 arithmetic gives for that
    residual stream, but for the interpreter's e4m3 rounding (see above; ~5% of outputs at these sizes). With the
    row as one block and as two (`SPLIT`: 32 + 16, 1024 + 128, and 256 + a masked 1 for a power of two)."""
    result = python_json(NORM_INTERPRETED.format(shape=shape, split=split) + NORM_REPORT, {"TRITON_INTERPRET": "1"})
    assert result["x_within_bf16_step"] and result["own_exact_but_interpreter_rounding"] > 0.999


@pytest.mark.parametrize("width, split", [(1152, True), (48, True), (256, False), (64, False)])
def test_the_norm_kernel_runs_its_measured_config_rows_as_two_blocks_where_the_width_is_no_power_of_two(width,
                                                                                                         split):
    """One config left at every width, no choice for autotuning: 4 rows, 4 warps, two-block where the width is no
    power of two."""
    from qandc.engines import triton_norm

    kernel = triton_norm._add_norm_modulate_fp8_kernel
    [kept] = kernel.early_config_prune(kernel.configs, {"C": width})
    assert (kept.kwargs, kept.num_warps) == ({"ROWS": 4, "SPLIT": split}, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("shape", NORM_SHAPES + [(2, 3, 256)])
def test_the_norm_kernel_computes_the_op_on_the_gpu(shape, dependent):
    """The residual add exact (float32, rounded once to bf16 as the op does), the e4m3 outputs nearly all equal:
    the GPU's float32 sums run in another order than the CPU's; rows as two blocks, and as one at a width of 256;
    launched as a dependent launch too (TORCHINDUCTOR_ENABLE_PDL=1), right after the copies of its inputs.
    `benchmarks/norm_rates.py` found all of both equal at DiT-XL/2's shape on the H200
    (gpu-logs/norm-h200-session11.log)."""
    result = python_json(NORM_GPU.format(shape=shape) + NORM_REPORT, {"TORCHINDUCTOR_ENABLE_PDL": str(int(dependent))})
    assert result["x_exact"] == 1.0 and result["exact"] > 0.99


def test_autotune_choices_go_back_to_the_autotuners_they_came_from():
    """What `autotune_choices.chosen` reads from the autotuners, through JSON, `restore` puts back: the same configs
    under the same keys; a config or a kernel this qandc does not have is skipped, and so is a config the kernel's
    pruning no longer keeps (older engines' norm choices: the kernel runs its measured config now)."""
    from qandc.engines import autotune_choices, triton_int8, triton_norm

    int8, norm = triton_int8._int8_gemm_kernel, triton_norm._add_norm_modulate_fp8_kernel
    held = {tuner: dict(tuner.cache) for tuner in autotune_choices.autotuners().values()}
    int8_key = (8192, 1152, 4608, "torch.int8", "torch.int8", "torch.float32", "torch.bfloat16", "torch.bfloat16")
    norm_key = (1152, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16", "torch.float8_e4m3fn")
    try:
        for tuner in held:
            tuner.cache.clear()
        (measured,) = triton_norm.measured_config(norm.configs, {"C": 1152})
        older = next(c for c in norm.configs if c is not measured)  # what an older build's autotuning could pick
        int8.cache[int8_key], norm.cache[norm_key] = int8.configs[3], older
        choices = json.loads(json.dumps(autotune_choices.chosen()))
        choices["int8_gemm"].append([[1, 2, 3], "BLOCK_M: 7, num_warps: 3"])  # no such config
        choices["a_kernel_gone"] = [[[1], str(int8.configs[0])]]
        int8.cache.clear()
        norm.cache.clear()
        assert autotune_choices.restore(choices) == 1
        assert int8.cache == {int8_key: int8.configs[3]} and norm.cache == {}
        choices["add_norm_modulate_fp8"] = [[list(norm_key), str(measured)]]
        assert autotune_choices.restore(choices) == 2 and norm.cache == {norm_key: measured}
    finally:
        for tuner, cache in held.items():
            tuner.cache.clear()
            tuner.cache.update(cache)


AUTOTUNED_TWICE = """
import json, torch
from qandc.engines import triton_int8, triton_norm
torch.manual_seed(0)
x, w = (torch.randint(-128, 128, s, dtype=torch.int8, device="cuda") for s in ((64, 256), (128, 256)))
triton_int8.int8_gemm(x, w, torch.rand(128, device="cuda"), torch.randn(128, device="cuda").bfloat16())
rows, modulation = torch.randn(2, 8, 1152, device="cuda").bfloat16(), torch.randn(2, 1152, device="cuda").bfloat16()
triton_norm.add_norm_modulate_fp8(rows, rows, modulation, modulation, modulation, torch.tensor(0.1, device="cuda"),
                                  1e-6)
kernels = {"int8": triton_int8._int8_gemm_kernel, "norm": triton_norm._add_norm_modulate_fp8_kernel}
print(json.dumps({name: {"timed": hasattr(k, "bench_time"), "chosen": str(k.best_config)}
                  for name, k in kernels.items()}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autotuning_choices_are_kept_on_disk_for_a_later_process(tmp_path):
    """The INT8 GEMM's and the norm kernel's autotuning (cache_results): a first process times the configs, a second
    one with the same Triton cache takes the first one's choice without timing any."""
    first, second = (python_json(AUTOTUNED_TWICE, {"TRITON_CACHE_DIR": str(tmp_path)}) for _ in range(2))
    for kernel in ("int8", "norm"):
        assert first[kernel]["timed"] and not second[kernel]["timed"]
        assert second[kernel]["chosen"] == first[kernel]["chosen"]
    assert {p.name for p in tmp_path.rglob("*.autotune.json")} == {"_int8_gemm_kernel.autotune.json",
                                                                     "_add_norm_modulate_fp8_kernel.autotune.json"}


INT8 = """
import json, torch, triton
from qandc.engines.quantized import int8_linear
from qandc.engines import triton_int8
m, k, n = {shape}
torch.manual_seed(m)
x, w = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (n, k), dtype=torch.int8)
scale, bias = torch.rand(n) * 1e-3, torch.randn(n).bfloat16()
want = int8_linear(x, w, scale, bias).float()
got = torch.empty((m, n), dtype=torch.bfloat16)
grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
triton_int8._int8_gemm_kernel.fn[grid](x, w, scale, bias, got, m, n, k, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)
got = got.float()
"""
INT8_REPORT = """
close = (got - want).abs() <= want.abs() * 2 ** -7
print(json.dumps({"shape": list(got.shape), "within_bf16_step": bool(close.all()),
                  "exact": (got == want).float().mean().item()}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_inductor.py runs the INT8 kernel on the GPU")
@pytest.mark.parametrize("shape", SHAPES)
def test_the_int8_kernel_computes_integer_products_under_the_interpreter(shape, interpreter):
    """Exact int32 products, scaled in float32; the interpreter truncates to bf16 where the GPU rounds to nearest
    (about half the outputs a bf16 step below, none further)."""
    result = python_json(INT8.format(shape=shape) + INT8_REPORT, {"TRITON_INTERPRET": "1"})
    assert result["shape"] == [shape[0], shape[2]] and result["within_bf16_step"] and result["exact"] > 0.3
