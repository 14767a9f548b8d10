"""The engine graphs of a DiT under a cache plan, declared once: what the ONNX exporter and the Inductor backend
trace, what the manifest records and what the runtime and the bench feed.

An engine set has a `full` graph (x, t, y -> out and one cache tensor per reused branch, named by branch) and a
`reuse` graph (x, t, y and those cache tensors -> out). Each tensor is declared with its role and dtype ("model":
the engine's compute dtype, e.g. float32 in ONNX, bf16 in Inductor); axis 0 is the batch and is dynamic. `regate`
says whether cache tensors hold pre-gate branch outputs that the reuse graph multiplies by its step's gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import QandcError

ROLES = ("x", "t", "y", "cache", "out")
DTYPES = ("float32", "int64", "model")
PATHS = ("full", "reuse")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """One engine graph: the model path it runs and its inputs and outputs, in order."""

    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    regate: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def cache_inputs(self) -> list[str]:
        return [t.name for t in self.inputs if t.role == "cache"]

    @property
    def cache_outputs(self) -> list[str]:
        return [t.name for t in self.outputs if t.role == "cache"]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} for name in self.input_names + self.output_names}

    def to_dict(self) -> dict:
        return {"path": self.path, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "regate": self.regate}

    @classmethod
    def from_dict(cls, data) -> "GraphSpec":
        try:
            tensors = {k: tuple(TensorSpec(t["name"], t["role"], t["dtype"]) for t in data[k])
                       for k in ("inputs", "outputs")}
            spec = cls(data["path"], tensors["inputs"], tensors["outputs"], data["regate"])
        except (KeyError, TypeError) as e:
            raise QandcError(f"graph declaration: missing or malformed field ({e})") from None
        bad = [t for t in spec.inputs + spec.outputs if not (isinstance(t.name, str) and t.role in ROLES
                                                               and t.dtype in DTYPES)]
        if spec.path not in PATHS or not isinstance(spec.regate, bool) or bad:
            raise QandcError(f"graph declaration: path must be {' or '.join(PATHS)}, tensors need a name, a role "
                             f"({', '.join(ROLES)}) and a dtype ({', '.join(DTYPES)})")
        return spec


def engine_graphs(branches: list[str], regate: bool = False) -> dict[str, GraphSpec]:
    """The full and the reuse graph of a reuse set `branches` (branch names in execution order)."""
    x, t, y = TensorSpec("x", "x", "float32"), TensorSpec("t", "t", "int64"), TensorSpec("y", "y", "int64")
    out = TensorSpec("out", "out", "model")
    cache = tuple(TensorSpec(b, "cache", "model") for b in branches)
    return {"full": GraphSpec("full", (x, t, y), (out, *cache), regate),
            "reuse": GraphSpec("reuse", (x, t, y, *cache), (out,), regate)}


def sample_inputs(model, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Example (x, t, y) on the device of `model` (a DiT or anything with its `config` and `device`): real classes
    and the null class, distinct timesteps."""
    c, device = model.config, model.device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=generator).to(device)
    t = torch.linspace(10, 990, batch).long().to(device)
    y = (torch.arange(batch) % (c.num_classes + 1)).to(device)
    return x, t, y


def example_feeds(model, graphs: dict[str, GraphSpec], batch: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """Example inputs of every graph, by graph and input name: the cache tensors are the full path's outputs."""
    x, t, y = sample_inputs(model, batch)
    full = graphs["full"]
    with torch.no_grad():
        _, cache = model.forward_full(x.to(model.pos_embed.dtype), t, y, branches=full.cache_outputs,
                                      regate=full.regate)
    tensors = {"x": x, "t": t, "y": y, **cache}
    return {name: {n: tensors[n] for n in spec.input_names} for name, spec in graphs.items()}


class PathGraph(nn.Module):
    """One graph as a traceable module: positional inputs in the declared order, a tuple of the declared outputs.
    x comes in float32 and is cast to the model's dtype."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.dtype = model.pos_embed.dtype

    def forward(self, *inputs):
        feeds = dict(zip(self.spec.input_names, inputs))
        x, t, y, regate = feeds["x"].to(self.dtype), feeds["t"], feeds["y"], self.spec.regate
        if self.spec.path == "reuse":
            return (self.model.forward_reuse(x, t, y, {b: feeds[b] for b in self.spec.cache_inputs}, regate=regate),)
        out, cache = self.model.forward_full(x, t, y, branches=self.spec.cache_outputs, regate=regate)
        return (out, *[cache[b] for b in self.spec.cache_outputs])
