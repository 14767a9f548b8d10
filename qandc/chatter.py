"""Third-party chatter (ModelOpt's "Inserted N quantizers", the ONNX tracer's TracerWarnings, scikit-learn's note
that a small spectral embedding falls back to a dense eigensolver): dropped unless `--verbose` (`show(True)`)."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

_shown = False


def show(verbose: bool) -> None:
    """Whether `quiet()` lets third-party prints and tracer warnings through (the CLI's --verbose)."""
    global _shown
    _shown = verbose


@contextlib.contextmanager
def quiet():
    """Drop what third-party code prints on stdout and the tracer's warnings inside, unless `show(True)`."""
    if _shown:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"k >= N for N \* N square matrix", RuntimeWarning)
        yield
