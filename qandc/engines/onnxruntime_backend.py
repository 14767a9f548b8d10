"""ONNX Runtime engines: the CPU execution provider (tested here; real int8 kernels for INT8 Q/DQ graphs) and the CUDA
provider (configured on torch's current CUDA device: each torchrun rank its own GPU; it runs only where
onnxruntime-gpu and a GPU exist). The optimised model is saved at build time, so loading does not optimise again; INT8
Q/DQ is rewritten to uint8 first (`ort_int8`), so its integer MatMuls are U8U8, exact on every CPU, whichever CPU
built it."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed, ort_int8
from ..artifacts import atomic_path
from ..errors import QandcError
from ..requires import require
from ..formats.manifest import onnx_input_names
from ..model.graphs import GraphSpec
from ..readers import regular_file
from .backend import Backend, BuildResult, Capabilities, check_engine_inputs

SUFFIX = ".ort.onnx"
INPUT_DTYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64}  # what qandc's graphs take


def _ort():
    return require("onnxruntime", "the onnxruntime backend")


def _session(path: Path, options, providers: list, u8: bool = False):
    """An InferenceSession (`u8`: of the graph rewritten by `ort_int8.to_u8`), with load errors (a damaged or foreign
    model) as one line."""
    ort = _ort()
    regular_file(path)
    try:
        if u8:
            return ort_int8.session(path, options, providers)
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # protobuf, onnx and each ONNX Runtime status raise their own types on a damaged model
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise QandcError(f"{path}: not a readable ONNX model for ONNX Runtime ({reason})") from None


def session_providers(available: list[str], device_index: int) -> list[tuple[str, dict]]:
    """The execution providers, with their options, of a session on GPU `device_index`: the CUDA provider there,
    then the CPU provider; only those in `available`."""
    chosen = {"CUDAExecutionProvider": {"device_id": str(device_index)}, "CPUExecutionProvider": {}}
    return [(name, options) for name, options in chosen.items() if name in available]


def providers() -> list[tuple[str, dict]]:
    """This process's execution providers: `session_providers` for torch's current CUDA device (cuda:LOCAL_RANK
    under torchrun, set before the engines load), or for the torchrun local rank where torch has no CUDA."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else distributed.torchrun_environment()[2]
    return session_providers(_ort().get_available_providers(), device)


def optimise(onnx_path: Path, target: Path) -> Path:
    """Optimise `onnx_path`, INT8 Q/DQ as uint8 (extended level: portable, Q/DQ fused into U8U8 kernels), and save
    it as `target`."""
    ort = _ort()
    with atomic_path(target) as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp)
        _session(onnx_path, options, ["CPUExecutionProvider"], u8=True)
    return target


class OrtEngine:
    """One engine of graph `spec`: `infer(feeds)` with tensors by declared input name, returns CPU tensors by output
    name."""

    def __init__(self, path: Path, spec: GraphSpec):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised at build time
        self.providers = providers()  # asked for; session.get_providers() says which ONNX Runtime has
        self.session = _session(path, options, self.providers)
        self.input_names, self.output_names = spec.input_names, spec.output_names
        self.onnx_names = dict(zip(spec.input_names, onnx_input_names(spec)))
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        if set(inputs) != set(self.onnx_names.values()) or \
                [o.name for o in self.session.get_outputs()] != self.output_names:
            raise QandcError(f"{path}: its inputs and outputs are not those of the {spec.name} graph its manifest "
                             "declares")
        unknown = [f"{name} ({kind})" for name, kind in inputs.items() if kind not in INPUT_DTYPES]
        if unknown:
            raise QandcError(f"{path}: inputs of a type qandc does not feed: {', '.join(unknown)}")
        self.input_dtypes = {n: INPUT_DTYPES[inputs[self.onnx_names[n]]] for n in self.input_names}
        self.device = torch.device("cpu")

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_engine_inputs(self, feeds)
        outputs = self.session.run(self.output_names, {self.onnx_names[n]: feeds[n].cpu().numpy()
                                                       for n in self.input_names})
        return {name: torch.from_numpy(array) for name, array in zip(self.output_names, outputs)}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    capabilities = Capabilities(devices=("cpu", "cuda"), precisions=("float", "w8a8-int8", "w8a8-fp8"))
    requires = ("onnxruntime", "onnx")  # onnx: INT8 graphs run rewritten (ort_int8)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": _ort().__version__}

    def build(self, export_dir, export, out, options) -> BuildResult:
        engines = {g: optimise(export_dir / file, out / f"{g}{SUFFIX}").name for g, file in export.onnx.items()}
        return BuildResult(engines, list(engines.values()))

    def load(self, folder, manifest, compile=True):
        return {g: OrtEngine(folder / file, manifest.graphs[g]) for g, file in manifest.engines.items()}
