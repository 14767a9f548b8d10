"""Stage 4: engines from an ONNX export — ONNX Runtime sessions or TensorRT plans — behind one small face
(`load_engines` -> {"full": engine, "reuse": engine}, each with `infer(feeds)`), and one manifest per engine set."""

from .build import BACKENDS, build_engines, load_engines

__all__ = ["BACKENDS", "build_engines", "load_engines"]
