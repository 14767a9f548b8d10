"""Forecasting cached branch outputs: the Newton form of the polynomial through a branch's last K+1 computations.

Per cached branch the cache holds K+1 factors: c0 = the last computed output, c1 and c2 the divided differences
[h0, h1] and [h0, h1, h2] over its last computation steps h0 > h1 > h2 (sampling-step indices, any spacing). A step s
that reuses the branch takes c0 + (s - h0) c1 + (s - h0)(s - h1) c2; a step that computes it (value v) refreshes
c0' = v, c1' = (v - c0) / (s - h0), c2' = (c1' - c1) / (s - h1). Exact for polynomials of degree K; order 0 is
plain reuse. Warm-up: after m computations the order used is min(K, m - 1).

The step arithmetic is the host's (`qandc.sampling.cache.BranchCache`); the graphs only see it as a per-row weight
tensor (`TAYLOR`, batch x rows x K): for a branch a graph reuses, its row holds the forecast weights
(s - h0, (s - h0)(s - h1)); for a branch it computes, the reciprocal gaps (1 / (s - h0), 1 / (s - h1)); zeros where
warm-up lowers the order.
The forecast is evaluated inside the graphs, so an engine takes the factors and the weights as device tensors and
returns the refreshed factors (no step index is baked into a graph, and under CUDA graphs it is a few fused
elementwise kernels of the captured step rather than launches of their own).
"""

from __future__ import annotations

import torch

TAYLOR = "taylor_weights"  # the graph input of forecast / refresh weights
FACTOR_SUFFIXES = ("", ".d1", ".d2")
TORCH_FACTOR_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def factor_names(branch: str, count: int) -> list[str]:
    """The tensor names of the first `count` factors of `branch`: the branch name itself, then `.d1`, `.d2`."""
    return [branch + suffix for suffix in FACTOR_SUFFIXES[:count]]


def forecast(factors: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """c0 + sum_j weights[:, j-1] c_j (in float32); `factors[0]` itself when there is nothing to add."""
    if len(factors) == 1:
        return factors[0]
    value = factors[0].float()
    for j, factor in enumerate(factors[1:]):
        value = value + weights[:, j].view(-1, 1, 1) * factor.float()
    return value


def refresh(value: torch.Tensor, previous: list[torch.Tensor], weights: torch.Tensor | None,
            dtype: torch.dtype) -> list[torch.Tensor]:
    """The K+1 factors after a computation `value`, from the previous c0..c(K-1) and the reciprocal gaps."""
    if not previous:
        return [value]
    new = [value.float()]
    for j, old in enumerate(previous):
        new.append((new[j] - old.float()) * weights[:, j].view(-1, 1, 1))
    return [factor.to(dtype) for factor in new]
