"""Stage 4: engines from an export — ONNX Runtime sessions, TensorRT plans, Inductor programs — behind one face
(`Backend`: name, capabilities, build, load; engines with `infer(feeds)`), registered by name, and one manifest
per engine set."""

from .backend import Backend, BuildOptions, BuildResult, Capabilities, backend_names, get_backend, register
from .build import build_engines, load_engines
from .inductor_backend import InductorBackend, build_inductor
from .onnxruntime_backend import OnnxRuntimeBackend
from .tensorrt_backend import TensorRTBackend

register(OnnxRuntimeBackend())
register(TensorRTBackend())
register(InductorBackend())

__all__ = ["Backend", "BuildOptions", "BuildResult", "Capabilities", "backend_names", "build_engines",
           "build_inductor", "get_backend", "load_engines", "register"]
