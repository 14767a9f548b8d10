"""Shared by the benchmark scripts: class-balanced image generation, writing a results table, timing a GPU call."""

from pathlib import Path

import numpy as np
import torch

from qandc.artifacts import atomic_path, read_json, write_json
from qandc.bench import device_name
from qandc.images import model_to_images, to_uint8
from qandc.sampling import sample


def generate_images(model, n: int, steps: int, sampler: str, plan, cfg_scale: float, seed: int, batch: int,
                    correction=None) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (labels i % classes, noise keyed by (seed, i)) and their labels; non-finite samples fail."""
    labels = torch.arange(n) % model.config.num_classes
    images = []
    for start in range(0, n, batch):
        out = sample(model, labels[start:start + batch], steps, sampler, cfg_scale, seed=seed, plan=plan,
                     correction=correction, sample_ids=range(start, min(start + batch, n)))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite samples")
        images.append(to_uint8(model_to_images(out, model.config))[..., 0])
    return np.concatenate(images), labels.numpy()


def cuda_graph_us(call) -> float:
    """µs of `call` a call replayed in a CUDA graph, as the engines run (median of Triton's `do_bench_cudagraph`;
    GPU only: Triton imported here, not by the CPU's benchmarks)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(call, rep=100, return_mode="median") * 1e3


def ran_on(state: Path, device: torch.device) -> dict:
    """The device a resumable state's rows ran on ({"device_name", "torch"}): recorded in state/device.json by the
    first run on a GPU, so that a summary written elsewhere (on the CPU) names the card that measured them."""
    path = state / "device.json"
    if device.type == "cuda" and not path.exists():
        write_json(path, {"device_name": device_name(device), "torch": torch.__version__})
    return read_json(path) if path.exists() else {"device_name": device_name(device), "torch": torch.__version__}


def seed_state(files: dict[Path, dict]) -> int:
    """Writes the state files a committed result gives back (path -> content), those missing only: a GPU machine keeps
    nothing between sessions, so a resumable benchmark's finished rows come back from its committed JSON and only
    what is missing, and what can be recomputed (images, recipes, engines), is computed again. Returns how many."""
    missing = {path: content for path, content in files.items() if not path.exists()}
    for path, content in missing.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, content)
    return len(missing)


def config_params(config) -> dict:
    """A Triton autotuning config as results record it: its kernel parameters, warps and stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, a line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def write_results(out: str, meta: dict, rows: list[dict], markdown: str) -> None:
    """`out` (JSON: meta + rows) and the markdown table beside it, atomically; the table is printed too."""
    write_json(out, {**meta, "rows": rows})
    with atomic_path(Path(out).with_suffix(".md")) as tmp:
        tmp.write_text(markdown)
    print(markdown)
