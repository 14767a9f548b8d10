"""Stage 3: ONNX export of the full and the reuse graph (Q/DQ from a quant recipe), with the manifest that
build-engine reads."""

from .export import MANIFEST, export

__all__ = ["MANIFEST", "export"]
