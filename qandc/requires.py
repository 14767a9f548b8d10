"""Optional dependencies: imported where needed, a missing one reported as one line naming the extra that brings it
(the import error itself is chained, so `--debug` shows it)."""

from __future__ import annotations

import importlib
import warnings

from .errors import QandcError

# import name -> (the distribution that provides it, the pip install argument that brings it)
PROVIDERS = {
    "modelopt": ("nvidia-modelopt", "'qandc[calibrate]'"),
    "matplotlib": ("matplotlib", "'qandc[calibrate]'"),
    "onnx": ("onnx", "'qandc[export]'"),
    "polygraphy": ("polygraphy", "'qandc[export]'"),
    "onnxruntime": ("onnxruntime", "'qandc[ort]' (or 'qandc[ort-gpu]' on a CUDA machine, not both)"),
    "tensorrt": ("TensorRT", "'qandc[tensorrt]' (on a CUDA machine)"),
    "diffusers": ("diffusers", "'qandc[vae]'"),
    "torchao": ("torchao", "'qandc[peers]'"),
    "fastapi": ("fastapi", "'qandc[serve]'"),
    "uvicorn": ("uvicorn", "'qandc[serve]'"),
    "prometheus_client": ("prometheus_client", "'qandc[serve]'"),
}


def require(module: str, user: str):
    """Import `module` (e.g. "modelopt.torch.quantization") for `user` (e.g. "qandc calibrate") and return it; a
    failure is a QandcError "USER needs DIST: pip install EXTRA", caused by the import error."""
    top = module.split(".")[0]
    dist, extra = PROVIDERS[top]
    try:
        with warnings.catch_warnings():  # ModelOpt's import notes the absent transformers: noise here
            warnings.filterwarnings("ignore", "Cannot find transformers package")
            return importlib.import_module(module)
    except ImportError as e:
        raise QandcError(f"{user} needs {dist}: pip install {extra}") from e


def require_all(modules: list[str], user: str) -> None:
    """`require` each module, before any work is done."""
    for module in modules:
        require(module, user)
