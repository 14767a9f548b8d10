"""PyTorch Inductor engines: the full and the reuse path of a bf16 model (with the recipe's FP8 / INT8 layers as
real kernels, `quantized.py`), each saved as a `torch.export` program (`full.pt2`, `reuse.pt2`, batch dynamic),
plus Inductor's portable compile cache (`inductor-cache.bin`) filled at build time for the batch sizes asked for,
so that loading recompiles from the cache instead of autotuning again.

AOTInductor packages would be the natural artifact, but loading one segfaulted on the GPU machine's torch 2.11
(environment.md); an exported program plus its saved compile cache is the reloadable engine instead. A build is
tied to the device type it ran on (the manifest says which). On the CPU no compile cache is written and the
engines run the exported programs as they are (eager), which is what the tests here exercise; compiling and CUDA
graphs need a GPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn as nn

from ..artifacts import atomic_path
from ..errors import QandcError
from . import quantized as quantized_module  # also registers qandc::int8_linear, which the programs call

SUFFIX = ".pt2"
CACHE = "inductor-cache.bin"
# bf16 engines autotune their GEMMs (the strongest baseline); quantized ones call cuBLASLt FP8 / the Triton INT8
# kernel (which autotunes itself), so Inductor's default mode suffices and compiles in a fraction of the time.
# CUDA graphs are the runtime's, per batch size.
COMPILE_MODES = {False: "max-autotune-no-cudagraphs", True: "default"}


class EngineGraph(nn.Module):
    """One path of a DiT as an engine graph: float32 x in (cast to the model's dtype), model-dtype outputs; the full
    path returns (out, *cache of `branches`), the reuse path takes those cache tensors after (x, t, y)."""

    def __init__(self, model, branches: list[str], regate: bool, reuse: bool):
        super().__init__()
        self.model, self.branches, self.regate, self.reuse = model, branches, regate, reuse
        self.dtype = model.pos_embed.dtype

    def forward(self, x, t, y, *cached):
        x = x.to(self.dtype)
        if self.reuse:
            return (self.model.forward_reuse(x, t, y, dict(zip(self.branches, cached)), regate=self.regate),)
        out, cache = self.model.forward_full(x, t, y, branches=self.branches, regate=self.regate)
        return (out, *[cache[b] for b in self.branches])


def io_names(graph: str, branches: list[str]) -> tuple[list[str], list[str]]:
    """(input names, output names) of the full or the reuse engine."""
    return (["x", "t", "y"], ["out", *branches]) if graph == "full" else (["x", "t", "y", *branches], ["out"])


def build(model, out_dir: Path, branches: list[str], regate: bool, batch_sizes: list[int]) -> list[Path]:
    """Export both paths of `model` (already in its inference dtype and quantized form, on its device) and, on a
    GPU, compile them for `batch_sizes` rows and save the compile cache. Returns the files written."""
    from ..exporter.onnx_export import sample_inputs

    x, t, y = sample_inputs(model, batch=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        _, cache = model.forward_full(x.to(model.pos_embed.dtype), t, y, branches=branches, regate=regate)
    files = []
    for graph in ("full", "reuse"):
        args = (x, t, y) if graph == "full" else (x, t, y, *[cache[b] for b in branches])
        module = EngineGraph(model, branches, regate, reuse=graph == "reuse")
        try:
            shapes = [{0: batch}] * 3 + ([({0: batch},) * len(branches)] if graph == "reuse" and branches else [])
            program = torch.export.export(module, args, dynamic_shapes=shapes)
        except Exception as e:  # torch.export reports untraceable code in many exception types
            raise QandcError(f"torch.export could not trace the {graph} path: {str(e).splitlines()[0][:300]}") from e
        target = out_dir / f"{graph}{SUFFIX}"
        buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temporary file has neither
        torch.export.save(program, buffer)
        with atomic_path(target) as tmp:
            tmp.write_bytes(buffer.getvalue())
        files.append(target)
    if model.device.type == "cuda":
        files.append(_fill_compile_cache(model, out_dir, files, branches, batch_sizes))
    return files


def _fill_compile_cache(model, out_dir: Path, programs: list[Path], branches, batch_sizes) -> Path:
    from ..exporter.onnx_export import sample_inputs

    torch.compiler.reset()
    quantized = any(isinstance(m, quantized_module.QuantLinear) for m in model.modules())
    engines = {g: InductorEngine(p, g, branches, True, quantized) for g, p in zip(("full", "reuse"), programs)}
    for rows in batch_sizes:
        x, t, y = sample_inputs(model, batch=rows)
        feeds = {"x": x, "t": t, "y": y}
        full = engines["full"].infer(feeds)
        engines["reuse"].infer({**feeds, **{b: full[b] for b in branches}})
    blob, _ = torch.compiler.save_cache_artifacts()
    target = out_dir / CACHE
    with atomic_path(target) as tmp:
        tmp.write_bytes(blob)
    return target


def load_compile_cache(path: Path) -> None:
    """Hand Inductor a build's saved compile cache before anything is compiled in this process."""
    if path.is_file():
        torch.compiler.load_cache_artifacts(path.read_bytes())


class InductorEngine:
    """One exported path: `infer(feeds)` with tensors by input name, returns tensors by output name, on the
    engine's device. `compile=True` runs it through torch.compile (Inductor); False runs the program eagerly."""

    def __init__(self, path: Path, graph: str, branches: list[str], compile: bool = True, quantized: bool = False):
        try:
            self.module = torch.export.load(str(path)).module()
        except Exception as e:  # a foreign or damaged program: torch raises many types here
            raise QandcError(f"{path}: not a torch.export program this torch can load ({str(e)[:200]})") from None
        self.input_names, self.output_names = io_names(graph, branches)
        self.device = next(iter([*self.module.parameters(), *self.module.buffers()])).device
        if self.device.type == "cuda":  # under torchrun: this rank's GPU, not the one the build ran on
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.module.to(self.device)
        self.compiled = compile
        mode = COMPILE_MODES[quantized]
        self.fn = torch.compile(self.module, mode=mode, dynamic=False) if compile else self.module

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise QandcError(f"engine inputs missing: {', '.join(sorted(missing))}")
        with torch.no_grad():
            outputs = self.fn(*[feeds[n].to(self.device) for n in self.input_names])
        return dict(zip(self.output_names, outputs))
