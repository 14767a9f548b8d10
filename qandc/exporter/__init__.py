"""Stage 3: ONNX export of the engine graphs (Q/DQ from a quant recipe), with the manifest build-engine reads."""

from .export import export

__all__ = ["export"]
