"""Whether DiT-XL/2's residual add should move into the GEMM before it (issue 17). After the attention's projection
and after fc2 the FP8 engines write the GEMM's bf16 output (delta), and qandc's norm kernel reads it back beside the
residual stream x: x' = x + gate · delta written, then LayerNorm + modulation + quantize of x' (66 MB a call, 23 µs,
56 calls of the 9.5 ms step). Were x' the GEMM's own output, the norm kernel would read x' and write the e4m3 alone
(28 MB). gate is per image and channel, so the GEMM runs batched over the images (256 rows each): x' = gate ⊙ (a ·
w^T · scales + bias) + x. Rows, at the projection's and fc2's shapes (K 1152 and 4608 -> 1152, 32 × 256 rows):
- `engines`: `_scaled_mm` (bf16 out, bias, fast accumulation), then `add_norm_modulate_fp8` (what the engines run);
- `scaled_mm_e4m3_out`: the GEMM writing delta as e4m3 at its own scale (folded into gate), the same norm kernel
  reading it (half of delta's bytes, both ways; costs delta's precision);
- `cudnn_fused`: a cuDNN graph (cudnn-frontend): FP8 matmul, × the scales, + bias, × gate [B, 1, N], + x -> x'
  bf16; then `triton_norm.norm_modulate_fp8` on it;
- `cublaslt_alpha_vector`: one cuBLASLt call (nvmath-python's bindings) batched over the images: FP8 operands, alpha
  a device vector of each image (gate · the operands' scales, ALPHA_DEVICE_VECTOR_BETA_HOST with its batch stride),
  the bias epilogue with a bias of each image (gate · bias), beta 1 with C = x: D = x' in bf16; then the same norm
  kernel (`cublaslt_alpha_vector_no_bias`: without the bias epilogue, should cuBLASLt refuse it; its x_error counts
  the bias left out). Last, as they call cuBLASLt with raw pointers: the JSON is written after every row, so that
  the rows before survive a crash there.
Each row, per shape: `gemm_us`, `norm_us` and `pair_us` (both as one call), replayed in a CUDA graph (the engines'
way); `x_error`, x' against float32 arithmetic on the same e4m3 operands (relative L2), and `e4m3_equal`, the share of
the norm's e4m3 output equal to the `engines` row's; or `error` where the library refused it. `ms_per_step`: the
pairs of both shapes, 28 blocks (the [B, N] products of gate with the scales and the bias not timed: the adaLN
GEMM's epilogue would give them). Whether cuBLASLt takes an alpha vector with FP8 operands, and cuDNN such an epilogue
on a Hopper GEMM, is what this finds out. GPU only (nvmath-python and nvidia-cudnn-frontend from the GPU bundle).

    python benchmarks/residual_gemm.py --out benchmarks/results/residual-gemm-h200.json
"""

import argparse

import numpy as np
import torch

from _common import cuda_graph_us
from qandc.artifacts import write_json
from qandc.engines import triton_norm
from qandc.engines.quantized import FP8_MAX
from qandc.errors import error_summary

BATCH, TOKENS, WIDTH, BLOCKS, EPS = 32, 256, 1152, 28, 1e-6
SHAPES = {"proj": WIDTH, "fc2": 4 * WIDTH}  # the GEMM's K; N is WIDTH for both
E4M3 = torch.float8_e4m3fn
WORKSPACE = 32 << 20


class Operands:
    """One shape's inputs as the engines hold them: e4m3 activations and weight with tensor-wide scales, a bf16 bias,
    the residual stream x and the adaLN chunks (gate, shift, scale) of each image, the norm's e4m3 scale."""

    def __init__(self, shape: str, k: int):
        self.shape, rows = shape, BATCH * TOKENS
        self.a = torch.randn(rows, k, device="cuda").to(E4M3)
        self.w = (torch.randn(WIDTH, k, device="cuda") * 4).to(E4M3)
        self.scale_a, self.scale_w = torch.tensor(0.05, device="cuda"), torch.tensor(0.01, device="cuda")
        self.bias = (torch.randn(WIDTH, device="cuda") * 0.1).bfloat16()
        self.x = torch.randn(BATCH, TOKENS, WIDTH, device="cuda").bfloat16()
        self.adaln = (torch.randn(BATCH, 6 * WIDTH, device="cuda") * 0.3).bfloat16()
        self.shift, self.scale, self.gate = self.chunks(self.adaln)
        self.q_scale = torch.tensor(0.02, device="cuda")
        delta = self.a.float() @ self.w.float().t() * (self.scale_a * self.scale_w) + self.bias.float()
        self.want_x = self.x.float() + self.gate.float()[:, None] * delta.reshape(BATCH, TOKENS, WIDTH)
        self.delta_scale = delta.abs().amax() / FP8_MAX  # a calibrated output scale, as a recipe would hold it

    @staticmethod
    def chunks(adaln: torch.Tensor) -> tuple:
        """shift, scale and gate: chunks of the adaLN output, rows of one stride (as the norm kernel takes them)."""
        return tuple(adaln[:, i * WIDTH:(i + 1) * WIDTH] for i in range(3))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return triton_norm.norm_modulate_fp8(x, self.shift, self.scale, self.q_scale, EPS)


def scaled_mm_calls(o: Operands, e4m3_out: bool = False) -> tuple:
    """`_scaled_mm` then `add_norm_modulate_fp8`, as the engines run them; `e4m3_out`: the GEMM writes delta as e4m3 at
    its own scale, folded into gate (in the adaLN output's layout, as the kernel reads it)."""
    gate, out = o.gate, {"out_dtype": torch.bfloat16}
    if e4m3_out:
        gate = o.chunks(o.adaln.clone())[2]
        gate.copy_(o.gate.float() * o.delta_scale)
        out = {"out_dtype": E4M3, "scale_result": 1 / o.delta_scale}

    def gemm():
        return torch._scaled_mm(o.a, o.w.t(), scale_a=o.scale_a, scale_b=o.scale_w, bias=o.bias, use_fast_accum=True,
                                **out).reshape(BATCH, TOKENS, WIDTH)
    delta = gemm()

    def norm(delta=delta):
        return triton_norm.add_norm_modulate_fp8(o.x, delta, gate, o.shift, o.scale, o.q_scale, EPS)
    return gemm, norm, lambda: norm(gemm()), lambda: norm()


class CublasLtResidualGemm:
    """x' = x + gate ⊙ (a · w^T · scales + bias) as one cuBLASLt call batched over the images. Column-major, as
    cuBLASLt sees row-major tensors: D [N, T] of each image = alpha ⊙ (w^T)^T · a^T + bias + 1 · C, alpha [N] and
    bias [N] of that image (their batch strides N), w the shared A (batch stride 0), FP8's TN layout."""

    def __init__(self, o: Operands, with_bias: bool = True):
        import nvmath
        from nvmath.bindings import cublas, cublasLt as lt

        self.lt, self.o = lt, o
        k = o.a.shape[1]
        self.handle = lt.create()
        self.desc = lt.matmul_desc_create(cublas.ComputeType.COMPUTE_32F, nvmath.CudaDataType.CUDA_R_32F)
        self.alpha = (o.gate.float() * (o.scale_a * o.scale_w)).contiguous()  # [B, N]
        self.bias = (o.gate.float() * o.bias.float()).bfloat16().contiguous()  # each image's gate · bias
        desc = lt.MatmulDescAttribute
        attributes = {desc.TRANSA: cublas.Operation.T, desc.TRANSB: cublas.Operation.N,
                      desc.POINTER_MODE: lt.PointerMode.ALPHA_DEVICE_VECTOR_BETA_HOST,
                      desc.ALPHA_VECTOR_BATCH_STRIDE: WIDTH, desc.FAST_ACCUM: 1}
        if with_bias:
            attributes.update({desc.EPILOGUE: lt.Epilogue.BIAS, desc.BIAS_POINTER: self.bias.data_ptr(),
                               desc.BIAS_DATA_TYPE: nvmath.CudaDataType.CUDA_R_16BF, desc.BIAS_BATCH_STRIDE: WIDTH})
        for attribute, value in attributes.items():
            self._set(lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype, self.desc, attribute, value)
        e4m3, bf16 = nvmath.CudaDataType.CUDA_R_8F_E4M3, nvmath.CudaDataType.CUDA_R_16BF
        self.layouts = [self._layout(e4m3, k, WIDTH, k, 0),  # w [N, K] row-major: [K, N] column-major, shared
                        self._layout(e4m3, k, TOKENS, k, TOKENS * k),  # an image's a: [K, T]
                        self._layout(bf16, WIDTH, TOKENS, WIDTH, TOKENS * WIDTH),  # C = x
                        self._layout(bf16, WIDTH, TOKENS, WIDTH, TOKENS * WIDTH)]  # D = x'
        preference = lt.matmul_preference_create()
        self._set(lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype, preference,
                  lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, WORKSPACE)
        self.results = np.zeros(8, dtype=lt.matmul_heuristic_result_dtype)
        found = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(self.handle, self.desc, *self.layouts, preference, len(self.results),
                                     self.results.ctypes.data, found.ctypes.data)
        if found[0] == 0 or self.results[0]["state"] != 0:
            raise RuntimeError(f"cuBLASLt found no algorithm for this FP8 GEMM with an alpha vector "
                               f"({found[0]} found, state {self.results[0]['state']})")
        self.algo = self.results.ctypes.data + self.results.dtype.fields["algo"][1]  # the first result's
        self.beta = np.ones(1, dtype=np.float32)
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
        self.out = torch.empty_like(o.x)

    @staticmethod
    def _set(setter, dtype_of, target, attribute, value):
        buffer = np.array([value], dtype=dtype_of(attribute))
        setter(target, attribute, buffer.ctypes.data, buffer.itemsize)

    def _layout(self, dtype, rows, cols, ld, batch_offset):
        lt = self.lt
        layout = lt.matrix_layout_create(dtype, rows, cols, ld)
        for attribute, value in ((lt.MatrixLayoutAttribute.BATCH_COUNT, BATCH),
                                 (lt.MatrixLayoutAttribute.STRIDED_BATCH_OFFSET, batch_offset)):
            self._set(lt.matrix_layout_set_attribute, lt.get_matrix_layout_attribute_dtype, layout, attribute, value)
        return layout

    def __call__(self) -> torch.Tensor:
        o, (a_layout, b_layout, c_layout, d_layout) = self.o, self.layouts
        self.lt.matmul(self.handle, self.desc, self.alpha.data_ptr(), o.w.data_ptr(), a_layout, o.a.data_ptr(),
                       b_layout, self.beta.ctypes.data, o.x.data_ptr(), c_layout, self.out.data_ptr(), d_layout,
                       self.algo, self.workspace.data_ptr(), WORKSPACE, torch.cuda.current_stream().cuda_stream)
        return self.out


class CudnnResidualGemm:
    """The same x' as a cuDNN graph: FP8 matmul of each image's a [T, K] by the shared w^T [K, N], × the scales,
    + bias, × gate [1, N] of the image, + x, bf16 out."""

    def __init__(self, o: Operands):
        import cudnn

        self.cudnn, self.o, self.handle = cudnn, o, cudnn.create_handle()
        k, f32, bf16 = o.a.shape[1], cudnn.data_type.FLOAT, cudnn.data_type.BFLOAT16
        graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32,
                              handle=self.handle)
        fp8 = cudnn.data_type.FP8_E4M3
        a = graph.tensor(name="a", dim=(BATCH, TOKENS, k), stride=(TOKENS * k, k, 1), data_type=fp8)
        w = graph.tensor(name="w", dim=(1, k, WIDTH), stride=(WIDTH * k, 1, k), data_type=fp8)
        scale = graph.tensor(name="scale", dim=(1, 1, 1), stride=(1, 1, 1), data_type=f32)
        bias = graph.tensor(name="bias", dim=(1, 1, WIDTH), stride=(WIDTH, WIDTH, 1), data_type=bf16)
        gate = graph.tensor(name="gate", dim=(BATCH, 1, WIDTH), stride=(o.gate.stride(0), WIDTH, 1), data_type=bf16)
        x = graph.tensor(name="x", dim=(BATCH, TOKENS, WIDTH), stride=(TOKENS * WIDTH, WIDTH, 1), data_type=bf16)
        product = graph.matmul(name="matmul", A=a, B=w, compute_data_type=f32)
        product.set_data_type(f32)
        gated = graph.mul(name="gated", a=graph.add(name="biased", a=graph.mul(name="scaled", a=product, b=scale),
                                                     b=bias), b=gate)
        out = graph.add(name="residual", a=gated, b=x)
        out.set_output(True).set_data_type(bf16)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
        self.out = torch.empty_like(o.x)
        self.pack = {a: o.a.reshape(BATCH, TOKENS, k), w: o.w.t().unsqueeze(0),
                     scale: (o.scale_a * o.scale_w).float().reshape(1, 1, 1), bias: o.bias.reshape(1, 1, WIDTH),
                     gate: o.gate.unsqueeze(1), x: o.x, out: self.out}

    def __call__(self) -> torch.Tensor:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.graph.execute(self.pack, self.workspace, handle=self.handle)
        return self.out


def fused_calls(gemm, o: Operands) -> tuple:
    x = gemm()
    return gemm, lambda: o.norm(x), lambda: o.norm(gemm()), lambda: (x, o.norm(x))


def row(calls, o: Operands, engines_q: torch.Tensor | None) -> dict:
    """One row at one shape: its CUDA-graph times and errors; `calls` (gemm, norm, pair, outputs): outputs gives
    (x', e4m3) of the row."""
    gemm, norm, pair, outputs = calls
    x, q = outputs()
    result = {"gemm_us": cuda_graph_us(gemm), "norm_us": cuda_graph_us(norm), "pair_us": cuda_graph_us(pair),
              "x_error": ((x.float() - o.want_x).norm() / o.want_x.norm()).item()}
    if engines_q is not None:
        result["e4m3_equal"] = (q.float() == engines_q.float()).float().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    operands = {shape: Operands(shape, k) for shape, k in SHAPES.items()}
    engines = {shape: scaled_mm_calls(o) for shape, o in operands.items()}
    engines_q = {shape: calls[3]()[1] for shape, calls in engines.items()}
    # row by row over both shapes, the raw-pointer cuBLASLt calls last: should one bring the process down, every
    # row before it is written
    makers = {"engines": lambda o: engines[o.shape], "scaled_mm_e4m3_out": lambda o: scaled_mm_calls(o, e4m3_out=True),
              "cudnn_fused": lambda o: fused_calls(CudnnResidualGemm(o), o),
              "cublaslt_alpha_vector": lambda o: fused_calls(CublasLtResidualGemm(o), o),
              "cublaslt_alpha_vector_no_bias": lambda o: fused_calls(CublasLtResidualGemm(o, with_bias=False), o)}
    results, steps = {}, {}
    for name, make in makers.items():
        results[name] = {}
        for shape, o in operands.items():
            try:
                results[name][shape] = row(make(o), o, None if name == "engines" else engines_q[shape])
            except Exception as e:  # a library refusing the graph or the pointer mode: recorded, not fatal
                results[name][shape] = {"error": error_summary(e)}
            print(f"{shape:5s} {name:30s} {results[name][shape]}", flush=True)
        steps = {row_name: sum(r[s]["pair_us"] for s in SHAPES) * BLOCKS / 1e3 for row_name, r in results.items()
                 if all("pair_us" in r[s] for s in SHAPES)}
        write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "shape_btc": [BATCH, TOKENS, WIDTH], "k": SHAPES, "rows": results, "ms_per_step": steps})
    for name, ms in steps.items():
        print(f"{name:30s} {ms:6.2f} ms a step")


if __name__ == "__main__":
    main()
