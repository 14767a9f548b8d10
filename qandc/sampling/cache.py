"""The sampler's cache state: the tensors a cache plan's graphs exchange between steps, and the step arithmetic of
forecasting (`qandc.model.forecast`), which reaches the graphs as Taylor weights."""

from __future__ import annotations

import torch

from ..model.forecast import TAYLOR


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queued work (a copy from pageable memory would
    wait for it: the host could not run ahead of the steps it launched); a CUDA copy goes through pinned memory."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


class BranchCache:
    """What the sampler carries between steps for a cache plan: the cached tensors by graph-tensor name and, when
    forecasting, each branch's computation steps. `feeds` gives a graph its cache inputs for step s, `store`
    takes its outputs."""

    def __init__(self, order: int, factor_dtype: torch.dtype, token_shape: tuple[int, int], device):
        self.order, self.factor_dtype, self.token_shape, self.device = order, factor_dtype, token_shape, device
        self.tensors: dict[str, torch.Tensor] = {}
        self.steps: dict[str, list[int]] = {}  # branch -> its computation steps, latest first (K kept)
        self.counts: dict[str, int] = {}
        # step -> its Taylor weights on the device, made once: another run of the same plan can take them (a CUDA
        # graph capture of a whole run must not copy from the host)
        self.taylor: dict[int, torch.Tensor] = {}

    def _weights(self, branch: str, step: int, reused: bool) -> list[float]:
        seen, count = self.steps.get(branch, []), self.counts.get(branch, 0)
        weights = [0.0] * self.order
        if reused:
            product = 1.0
            for j in range(min(self.order, count - 1)):
                product *= step - seen[j]
                weights[j] = product
        else:
            for j in range(min(self.order, count)):
                weights[j] = 1.0 / (step - seen[j])
        return weights

    def feeds(self, spec, step: int, rows: int) -> dict[str, torch.Tensor]:
        """The cache inputs of graph `spec` at sampling step `step` for a batch of `rows`."""
        feeds = {}
        for name in spec.cache_inputs:
            if name not in self.tensors:  # before a branch's first computation: zero factors, weighted by 0
                self.tensors[name] = torch.zeros(rows, *self.token_shape, dtype=self.factor_dtype,
                                                 device=self.device)
            feeds[name] = self.tensors[name]
        if self.order:
            if step not in self.taylor:
                table = [self._weights(b, step, True) for b in spec.reuse]
                table += [self._weights(b, step, False) for b in spec.emit]
                self.taylor[step] = to_device(torch.tensor(table, dtype=torch.float32), self.device) \
                    .expand(rows, -1, -1).contiguous()
            feeds[TAYLOR] = self.taylor[step]
        return feeds

    def store(self, spec, step: int, outputs: dict[str, torch.Tensor]) -> None:
        """Keep the factors graph `spec` returned at `step`; its computed branches gain that step."""
        for name in spec.cache_outputs:
            self.tensors[name] = outputs[name]
        for branch in spec.emit:
            self.steps[branch] = [step, *self.steps.get(branch, [])][:max(self.order, 1)]
            self.counts[branch] = self.counts.get(branch, 0) + 1
