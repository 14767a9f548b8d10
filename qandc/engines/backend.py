"""The face every engine backend has, and the registry the CLI, the builder and the runtime ask.

A backend is one class with a name, declared capabilities, `build` (engines for every graph of an export, into a
folder) and `load` (those engines, each with `infer(feeds) -> outputs` by tensor name and its `input_dtypes`).
Adding one is a new file plus one `register(...)` line in `qandc/engines/__init__.py`; nothing else compares backend
names.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..errors import QandcError
from ..formats.manifest import EngineManifest, ExportManifest


@dataclass(frozen=True)
class Capabilities:
    """devices: where its engines run. precisions: the exports it builds engines of ("float", or the recipe presets
    it takes); `build_engines` refuses any other before building.
    cuda_graphs: its engines may be captured and replayed as CUDA graphs. batch_profile: its engines take batches
    only up to the `max_batch` they were built for."""

    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    cuda_graphs: bool = False
    batch_profile: bool = False


@dataclass(frozen=True)
class BuildOptions:
    """max_batch: the largest batch of a batch profile. batch_sizes: row counts to compile for at build time."""

    max_batch: int = 64
    batch_sizes: tuple[int, ...] = ()


@dataclass
class BuildResult:
    """What a build wrote: the engine file of each graph, every file to checksum, and the backend's own record."""

    engines: dict[str, str]
    files: list[str]
    record: dict = field(default_factory=dict)


class Engine(Protocol):
    input_names: list[str]
    input_dtypes: dict[str, torch.dtype]
    output_names: list[str]
    device: torch.device

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class Backend(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    requires: ClassVar[tuple[str, ...]] = ()  # the modules it imports beyond torch

    def available(self) -> bool:
        """Whether its libraries are installed here (whether engines can be built or loaded on this machine)."""
        return all(importlib.util.find_spec(module) is not None for module in self.requires)

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """The versions of the libraries its engines depend on."""

    @abstractmethod
    def build(self, export_dir: Path, export: ExportManifest, out: Path, options: BuildOptions) -> BuildResult:
        """Build an engine for every graph of the export into `out` (which exists), each file written atomically."""

    @abstractmethod
    def load(self, folder: Path, manifest: EngineManifest, compile: bool = True) -> dict[str, Engine]:
        """The engines of a verified engine folder, by graph name."""

    def batch_limit(self, manifest: EngineManifest) -> int | None:
        return manifest.build.get("max_batch") if self.capabilities.batch_profile else None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make a backend available by its name to build-engine, the runtime and the CLI."""
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise QandcError(f"unknown backend {name!r}; choose {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_engine_inputs(engine: Engine, feeds: dict) -> None:
    """Every input the engine declares is fed, in its dtype (one line naming the missing or mistyped ones)."""
    missing = set(engine.input_names) - set(feeds)
    if missing:
        raise QandcError(f"engine inputs missing: {', '.join(sorted(missing))}")
    wrong = [f"{n} is {feeds[n].dtype}, not {engine.input_dtypes[n]}" for n in engine.input_names
             if feeds[n].dtype != engine.input_dtypes[n]]
    if wrong:
        raise QandcError(f"engine inputs of another dtype: {'; '.join(wrong[:3])}")
