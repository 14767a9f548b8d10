"""TensorRT engines, written against the TensorRT 10 Python API.

NOT RUN in this project's environment: full TensorRT cannot be installed here (PyPI's tensorrt libs are stubs that
download from an unreachable index; TensorRT-RTX refuses Hopper). Its tests run where `tensorrt` imports and skip
elsewhere. Q/DQ graphs build as strongly typed networks (precision comes from the graph, so no precision flags);
float graphs may ask for BF16 / FP16 builder flags. A plan is built for every graph of the export (full, reuse,
reuse1, ...). One optimisation profile covers batch 1..max_batch for every input (x, t, y, the cache tensors, the Taylor
weights: axis 0 is the batch, the other axes are fixed), and the timing cache is kept beside the plans so a rebuild
reuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import atomic_path
from ..errors import QandcError
from ..requires import require
from ..formats.manifest import onnx_input_names
from ..model.graphs import GraphSpec
from ..readers import open_regular, regular_file
from .backend import Backend, BuildResult, Capabilities, check_engine_inputs

SUFFIX = ".plan"
TIMING_CACHE = "timing.cache"


def _read(path: Path) -> bytes:
    """A regular file's bytes (a plan or timing cache; a FIFO or device is refused)."""
    with open_regular(path) as f:
        return f.read()


def _trt():
    return require("tensorrt", "the tensorrt backend")


def build_plan(onnx_path: Path, out_dir: Path, name: str, quantized: bool, max_batch: int = 64,
               opt_batch: int = 32, float_precision: str = "bf16") -> Path:
    """Parse the ONNX graph, build a serialised plan NAME.plan (atomically) and update the timing cache."""
    _trt()
    import tensorrt as trt  # a plain import, so that mypy types every call against TensorRT's stubs
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if quantized else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    regular_file(onnx_path)  # a FIFO would block the parser
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QandcError(f"{onnx_path}: TensorRT cannot parse it ({errors[:300]})")
    config = builder.create_builder_config()
    if not quantized and float_precision in ("bf16", "fp16"):
        config.set_flag(trt.BuilderFlag.BF16 if float_precision == "bf16" else trt.BuilderFlag.FP16)
    cache_path = out_dir / TIMING_CACHE
    cache = config.create_timing_cache(_read(cache_path) if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise QandcError(f"{onnx_path}: input {tensor.name} {tuple(tensor.shape)} has dynamic axes besides the "
                             "batch")
        profile.set_shape(tensor.name, (1, *rest), (min(opt_batch, max_batch), *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise QandcError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    target = out_dir / f"{name}{SUFFIX}"
    with atomic_path(target) as tmp:
        tmp.write_bytes(bytes(plan))
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return target


class TrtEngine:
    """One deserialised plan of graph `spec`: `infer(feeds)` with tensors by declared input name, returns CUDA
    tensors by output name."""

    def __init__(self, path: Path, spec: GraphSpec):
        import torch

        _trt()
        import tensorrt as trt

        self.torch, self.trt = torch, trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(_read(path))
        if self.engine is None:
            raise QandcError(f"{path}: not a TensorRT plan for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names, self.output_names = spec.input_names, spec.output_names
        self.tensor_names = dict(zip(spec.input_names, onnx_input_names(spec)))  # as the ONNX graph names them
        if {n for n in names if is_input[n]} != set(self.tensor_names.values()) or \
                {n for n in names if not is_input[n]} != set(self.output_names):
            raise QandcError(f"{path}: its inputs and outputs are not those of the {spec.name} graph its manifest "
                             "declares")
        self.input_dtypes = {n: self._dtype(self.tensor_names[n]) for n in self.input_names}
        self.device = torch.device("cuda")

    def _dtype(self, name: str):
        """The torch dtype of an input or output tensor of the plan."""
        return self.torch.from_numpy(np.empty(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def infer(self, feeds: dict) -> dict:
        check_engine_inputs(self, feeds)
        torch = self.torch
        inputs = {self.tensor_names[n]: torch.as_tensor(feeds[n]).cuda().contiguous() for n in self.input_names}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name),
                                        device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise QandcError("TensorRT execution failed")
        stream.synchronize()
        return outputs


class TensorRTBackend(Backend):
    name = "tensorrt"
    capabilities = Capabilities(devices=("cuda",), precisions=("float", "w8a8-int8", "w8a8-fp8"),
                                batch_profile=True)
    requires = ("tensorrt",)

    def versions(self) -> dict[str, str]:
        return {"tensorrt": _trt().__version__}

    def build(self, export_dir, export, out, options) -> BuildResult:
        quantized = export.recipe is not None
        engines = {g: build_plan(export_dir / file, out, g, quantized, options.max_batch).name
                   for g, file in export.onnx.items()}
        return BuildResult(engines, list(engines.values()), {"max_batch": options.max_batch})

    def load(self, folder, manifest, compile=True):
        return {g: TrtEngine(folder / file, manifest.graphs[g]) for g, file in manifest.engines.items()}
