"""The engine graphs of a DiT under a cache plan, declared once: what the ONNX exporter and the Inductor backend
trace, what the manifest records, and what the sampler feeds to a model or to engines alike.

An engine set has a `full` graph and one graph per reuse set of the plan (`reuse`, `reuse1`, ...). Every graph takes
x, t, y; a reuse graph also takes the cached factors of the branches it reuses (forecast from them when the plan
forecasts), and every graph computes the other branches, returning the refreshed factors of those the plan caches
(`emit`). With forecasting, a graph also takes the previous factors of the branches it emits and the Taylor weights
(`qandc.sampling.forecast`). Each tensor is declared with its role and dtype ("model": the engine's compute dtype,
e.g. float32 in ONNX, bf16 in Inductor); axis 0 is the batch and is dynamic. `regate` says whether cache tensors
hold pre-gate branch outputs that a reuse graph multiplies by its step's gate.

A plan whose one reuse set is every branch, without regating, caches the trunk instead (`TRUNK`, one pseudo-branch):
what all the blocks together added to the embedded input, x_L - x_0 = the sum of every gated branch output. Reusing
every branch is reusing that sum, and its forecast is the sum of theirs (every branch then has the same computation
steps, so the same Taylor weights; the forecast is linear in the factors). One tensor (K+1 with forecasting) moves
between steps instead of one per branch, and a reuse step runs no block at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import QandcError
from .forecast import TAYLOR, factor_names

FACTOR_SPEC_DTYPES = {"float32": "float32", "bf16": "bfloat16"}
TRUNK = "trunk"  # the pseudo-branch of a plan that reuses every branch: the blocks' sum, x_L - x_0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """One engine graph: `reuse` the branches it takes from the cache (none: the full graph), `emit` the cached
    branches it computes and returns; `forecast` the plan's order, `factors` the dtype of its factors."""

    name: str
    reuse: tuple[str, ...]
    emit: tuple[str, ...]
    regate: bool = False
    forecast: int = 0
    factors: str = "float32"

    @property
    def path(self) -> str:
        return "full" if self.name == "full" else "reuse"

    @property
    def rows(self) -> list[str]:
        """The branches of the Taylor-weight rows: reused ones, then emitted ones."""
        return [*self.reuse, *self.emit]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        dtype, k = self._cache_dtype, self.forecast
        cache = [TensorSpec(n, "cache", dtype) for b in self.reuse for n in factor_names(b, k + 1)]
        cache += [TensorSpec(n, "cache", dtype) for b in self.emit for n in factor_names(b, k)]
        weights = [TensorSpec(TAYLOR, "weights", "float32")] if k else []
        return (TensorSpec("x", "x", "float32"), TensorSpec("t", "t", "int64"), TensorSpec("y", "y", "int64"),
                *cache, *weights)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        cache = [TensorSpec(n, "cache", self._cache_dtype) for b in self.emit
                 for n in factor_names(b, self.forecast + 1)]
        return (TensorSpec("out", "out", "model"), *cache)

    @property
    def _cache_dtype(self) -> str:
        return FACTOR_SPEC_DTYPES[self.factors] if self.forecast else "model"

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

    def to_dict(self) -> dict:
        """The declaration, with its tensors spelled out for readers of the manifest."""
        return {"name": self.name, "reuse": list(self.reuse), "emit": list(self.emit), "regate": self.regate,
                "forecast": self.forecast, "factors": self.factors,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data) -> "GraphSpec":
        try:
            spec = cls(data["name"], tuple(data["reuse"]), tuple(data["emit"]), data["regate"], data["forecast"],
                       data["factors"])
            tensors = [[t.to_dict() for t in spec.inputs], [t.to_dict() for t in spec.outputs]]
            consistent = tensors == [data["inputs"], data["outputs"]]
        except (KeyError, TypeError) as e:
            raise QandcError(f"graph declaration: missing or malformed field ({e})") from None
        if not consistent:
            raise QandcError(f"graph declaration {spec.name!r}: its tensors are not those its reuse / emit sets "
                             "and forecast order give")
        return spec


def engine_graphs(plan, branch_names: list[str]) -> dict[str, GraphSpec]:
    """The full graph and every reuse graph of `plan` (a `qandc.sampling.CachePlan`: the sampling stage's, read
    here, not imported) for a model with `branch_names`."""
    cached, reuse_sets = plan.cached_branches(branch_names), plan.reuse_sets_of(branch_names)
    common = dict(regate=plan.regate, forecast=plan.forecast, factors=plan.factors)
    if not plan.regate and list(reuse_sets.values()) == [list(branch_names)]:
        return {"full": GraphSpec("full", (), (TRUNK,), **common),
                **{name: GraphSpec(name, (TRUNK,), (), **common) for name in reuse_sets}}
    graphs = {"full": GraphSpec("full", (), tuple(cached), **common)}
    for name, reused in reuse_sets.items():
        graphs[name] = GraphSpec(name, tuple(reused), tuple(b for b in cached if b not in reused), **common)
    return graphs


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
    """Example inputs of every graph, by graph and input name: the cache tensors are what the full graph returns
    (with forecasting: its second computation, three steps after a first one, so that no factor is zero), the
    Taylor weights those of a mid-run step."""
    x, t, y = sample_inputs(model, batch)
    full = graphs["full"]
    tensors = {"x": x, "t": t, "y": y}
    with torch.no_grad():
        if not full.forecast:
            tensors.update(model.forward_graph(full, dict(tensors)))
            return {name: {n: tensors[n] for n in spec.input_names} for name, spec in graphs.items()}
        factor = torch.float32 if full.factors == "float32" else torch.bfloat16
        tokens = (model.config.input_size // model.config.patch_size) ** 2
        zeros = torch.zeros(batch, tokens, model.config.hidden_size, dtype=factor, device=model.device)
        weights = torch.zeros(batch, len(full.rows), full.forecast, device=model.device)
        first = model.forward_graph(full, {**tensors, TAYLOR: weights, **{n: zeros for n in full.cache_inputs}})
        gaps = torch.tensor([1 / 3, 1 / 6][:full.forecast], device=model.device).expand_as(weights).contiguous()
        tensors.update(model.forward_graph(full, {"x": 0.9 * x, "t": t, "y": y, TAYLOR: gaps,
                                                  **{n: first[n] for n in full.cache_inputs}}))
    tensors[TAYLOR] = torch.tensor([1.0, 2.0][:full.forecast], device=model.device).expand_as(weights).contiguous()
    return {name: {n: tensors[n] for n in spec.input_names} for name, spec in graphs.items()}


class PathGraph(nn.Module):
    """One graph as a traceable module: positional inputs in the declared order, a tuple of the declared outputs."""

    def __init__(self, model, spec: GraphSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, *inputs):
        outputs = self.model.forward_graph(self.spec, dict(zip(self.spec.input_names, inputs)))
        return tuple(outputs[n] for n in self.spec.output_names)
