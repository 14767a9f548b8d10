"""fc1, its GELU (tanh) and fc2's activation quantize as one cuBLASLt call, through nvmath-python's `Matmul`:
e4m3 operands with tensor-wide scales, the GELU + bias epilogue, an e4m3 result scaled by the inverse of the next
layer's activation scale. cuBLASLt runs these epilogues in its own warp-specialised FP8 kernels, which overlap a tile's
epilogue with the next tile's products: the Triton kernel of `triton_fp8` cannot (fc1 of DiT-XL/2 on an H200: 106 us
against `_scaled_mm`'s 78 us without the GELU, `benchmarks/results/gemm-h200.json`).

cuBLASLt's bias runs along the rows of A, so the call computes the transpose, weight @ x.T, into a column-major
[N, M] result — the row-major [M, N] that fc2 reads. The result's layout follows C's: a bf16 C of that layout, with
beta 0, which cuBLASLt never reads. One planned `Matmul` a (device, M, N, K, accumulation), planned on first use
(outside a CUDA graph capture: the engines run once before they capture); a call rebinds its operands, bias and
scales — pointers only, nothing copied — so calls are capture-safe.

Tensor-wide weight scales only (cuBLASLt's FP8 scaling on Hopper; the FP8 recipes' default); rows, K and N multiples
of 16 (its FP8 layouts; an engine's rows are whole images' tokens: other calls take the Triton kernel). `usable`
says whether a call can run here: nvmath-python installed (carried to the GPU machine in `.gpu-bundle`; not a
dependency), a CUDA device of compute capability 8.9 or later (`usable_on`). CUDA only:
`tests/test_triton_kernels.py` checks it on a GPU; the CPU machines cannot run it."""

from __future__ import annotations

import functools
import logging

import torch

from ..errors import error_summary

# False: `quantized.fp8_linear_gelu_quant_tensorwise` runs the Triton kernel even where cuBLASLt is usable (a profile
# comparing the two: benchmarks/profile_step.py --fp8-mlp-kernel triton)
ENABLED = True
# True: a plan's candidate algorithms are timed on its first call's operands and the fastest kept (nvmath's
# `Matmul.autotune`; outside any capture, as planning is), where False keeps the heuristic's first choice. On an H200
# at fc1's shape (gemm-fc1-h200.json) the fastest candidate took 82.9 us with fast accumulation against the first
# choice's 89.8 (103.5 against 102.6 with the promotion): the engines autotune (benchmarks/gemm_rates.py times both)
AUTOTUNE = True
# why cuBLASLt could not plan a call here (its library refused the FP8 epilogue, say), once it could not: from then
# on the Triton kernel runs, after one warning
FAILURE: str | None = None
_PLANS: dict = {}  # (device, m, n, k, fast_accum, AUTOTUNE) -> (Matmul, the C that sets its result's layout)
log = logging.getLogger("qandc.engines")


class Unsupported(Exception):
    """cuBLASLt could not plan the call (FAILURE says why)."""


def usable_on(device: torch.device) -> bool:
    """Whether cuBLASLt's FP8 GELU epilogue can run on `device`: ENABLED, no FAILURE, nvmath-python installed, a CUDA
    device of compute capability 8.9 or later."""
    return ENABLED and FAILURE is None and _supported(torch.device(device))


@functools.cache
def _supported(device: torch.device) -> bool:
    """nvmath-python installed and `device` a CUDA device of compute capability 8.9 or later (asked once a device:
    the op asks on every call)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        import nvmath.linalg.advanced  # noqa: F401
    except ImportError:
        return False
    return True


def mlp_kernel(device: torch.device) -> str:
    """The fused FP8 MLP's kernel on `device`, as results record it: "cublaslt" where `usable_on`, else "triton"."""
    return "cublaslt" if usable_on(device) else "triton"


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fp8_gemm_gelu_quant` can run for e4m3 x [M, K] and weight [N, K] here."""
    return x.shape[0] % 16 == x.shape[1] % 16 == weight.shape[0] % 16 == 0 and usable_on(x.device)


def fp8_gemm_gelu_quant(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        inverse_out_scale: torch.Tensor, fast_accum: bool = False) -> torch.Tensor:
    """e4m3 clamp(gelu_tanh((x @ weight.T) * scale + bias) * inverse_out_scale) for e4m3 x [M, K], e4m3 weight
    [N, K], `scale` the float32 product of both operands' tensor-wide scales (shape () or (1,)), bf16 bias [N],
    `inverse_out_scale` float32 (shape () or (1,)); e4m3 [M, N]. `fast_accum`: cuBLASLt's FP8 fast accumulation.
    Unsupported when cuBLASLt cannot plan it (FAILURE set, a warning logged)."""
    global FAILURE
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    key = (x.device, m, n, k, fast_accum, AUTOTUNE)
    scales = {"a": scale.reshape(()), "b": _one(x.device), "d": inverse_out_scale.reshape(())}
    if key not in _PLANS:
        try:
            _PLANS[key] = _plan(weight, x, bias, scales, fast_accum)
        except Exception as e:  # nvmath's and cuBLASLt's errors have no common base
            FAILURE = error_summary(e)
            log.warning("cuBLASLt cannot run the fused FP8 MLP here (%s): the Triton kernel runs instead", FAILURE)
            raise Unsupported(FAILURE) from e
    matmul = _PLANS[key][0]
    matmul.reset_operands_unchecked(a=weight, b=x.t(), quantization_scales=scales, epilog_inputs={"bias": bias})
    return matmul.execute().t()


def _plan(weight, x, bias, scales, fast_accum):
    import nvmath
    from nvmath.linalg.advanced import Matmul, MatmulEpilog, MatmulOptions

    layout = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16, device=x.device).t()
    options = MatmulOptions(result_type=nvmath.CudaDataType.CUDA_R_8F_E4M3, fast_accumulation=fast_accum)
    matmul = Matmul(weight, x.t(), c=layout, beta=0.0, quantization_scales=scales, options=options)
    matmul.plan(epilog=MatmulEpilog.GELU_BIAS, epilog_inputs={"bias": bias})
    if AUTOTUNE:
        matmul.autotune(iterations=5)
    return matmul, layout


_ONES: dict = {}


def _one(device: torch.device) -> torch.Tensor:
    """A float32 1 on `device` (x's scale: `scale` carries both operands'), made once, outside any capture."""
    if device not in _ONES:
        _ONES[device] = torch.ones((), device=device)
    return _ONES[device]
