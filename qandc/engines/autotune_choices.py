"""The choices Triton's autotuning of qandc's own kernels (`triton_int8`, `triton_fp8`, `triton_norm`) holds once the
engines' graphs have run at every batch size of the build, saved beside the engines (`FILE`) and handed back to the
autotuners when the engines load: a process that loads them — a server's warm-up, the offline run, each rank on any
host — times no config again for those shapes and runs the one the build chose, so every process computes alike.
Triton's own disk cache (`cache_results`) keeps choices for one machine only. A choice whose key or config this
Triton or qandc does not have, or that the kernel's early pruning no longer keeps for its key (a choice qandc now makes
itself, as `triton_norm.measured_config`: older engines then run today's config), is skipped (that shape is tuned as
before). CUDA only (imported on first use)."""

from __future__ import annotations

FILE = "triton-autotune.json"


def autotuners() -> dict:
    """qandc's autotuned Triton kernels, by name."""
    from . import triton_fp8, triton_int8, triton_norm

    return {"int8_gemm": triton_int8._int8_gemm_kernel,
            "fp8_gemm_gelu_quant": triton_fp8._fp8_gemm_gelu_quant_kernel,
            "fp8_gemm_gelu_quant_tma": triton_fp8._fp8_gemm_gelu_quant_tma_kernel,
            "add_norm_modulate_fp8": triton_norm._add_norm_modulate_fp8_kernel}


def chosen() -> dict[str, list]:
    """Every autotuner's choices in this process: {kernel: [[its key's values, the config as Triton prints it]]}."""
    return {name: [[list(key), str(config)] for key, config in tuner.cache.items()]
            for name, tuner in autotuners().items() if tuner.cache}


def restore(choices: dict[str, list]) -> int:
    """Hand `choices` (as `chosen` gives them) to the autotuners; how many they took."""
    taken = 0
    for name, tuner in autotuners().items():
        configs = {str(config): config for config in tuner.configs}
        for key, config in choices.get(name, []):
            if config in configs and kept(tuner, key, configs[config]):
                tuner.cache[tuple(key)] = configs[config]
                taken += 1
    return taken


def kept(tuner, key, config) -> bool:
    """Whether `tuner`'s early pruning keeps `config` for the saved `key` (its leading values are the key
    arguments'): always without pruning, never where the pruning needs more than the key to tell."""
    if tuner.early_config_prune is None:
        return True
    try:
        return any(c is config for c in tuner.early_config_prune(tuner.configs, dict(zip(tuner.keys, key))))
    except KeyError:
        return False
