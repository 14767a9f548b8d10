"""Sharded work under torchrun: every rank computes its share of fixed-size work units, each kept as its own file.

`init` joins torchrun's process group (NCCL on GPUs, gloo on CPU) from the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK) and places the rank on cuda:LOCAL_RANK; outside torchrun it joins nothing. `run_shards`
assigns units round-robin, so what a unit holds never depends on the number of processes.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from .progress import progress

from .artifacts import atomic_path
from .errors import QandcError
from .readers import read_npz
from .values import INT_LIMIT, check, integer

SHARDS_ELSEWHERE = ("without a folder shared by every host, copy each host's OUT/shards here and run the same command "
                    "again as one process (finished shards are kept)")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun job; the default is a lone process."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        """Leave the process group (every rank, together, once the shared work is done)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init(device: torch.device) -> tuple[World, torch.device]:
    """This process's World and device. Under torchrun with several processes: join the process group (NCCL for
    a CUDA device, gloo for the CPU) and take cuda:LOCAL_RANK; otherwise `device` as it is."""
    size, rank, local_rank = torchrun_environment()
    if size == 1:
        return World(), device
    if device.type == "cuda":
        if device.index is not None:
            raise QandcError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; give 'cuda'")
        if local_rank >= torch.cuda.device_count():
            raise QandcError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise QandcError(f"--device {device}: torchrun runs support cuda and cpu")
    return World(rank, size), device


class Shard(NamedTuple):
    """A work unit's file and the stamp it must carry."""

    path: Path
    stamp: str


def torchrun_environment() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) without WORLD_SIZE. Variables missing beside
    WORLD_SIZE > 1 (WORLD_SIZE set by hand, without torchrun), not integers or out of range are a QandcError."""
    size = _environment_integer("WORLD_SIZE", 1, INT_LIMIT - 1) if "WORLD_SIZE" in os.environ else 1
    if size == 1:
        return 1, 0, 0
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise QandcError(f"WORLD_SIZE={size} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         "not: start the processes with torchrun, or unset WORLD_SIZE")
    _environment_integer("MASTER_PORT", 1, 65535)
    return size, _environment_integer("RANK", 0, size - 1), _environment_integer("LOCAL_RANK", 0, size - 1)


def _environment_integer(name: str, minimum: int, maximum: int) -> int:
    """The integer in environment variable `name`, within [minimum, maximum]."""
    text = os.environ[name]
    try:
        return check(f"environment variable {name}", integer, int(text), minimum=minimum, maximum=maximum)
    except ValueError:
        raise QandcError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None


def run_shards(folder: str | os.PathLike, units: list[dict], compute: Callable[[dict], dict[str, np.ndarray]],
               world: World, key: dict, desc: str = "shards") -> list[Shard]:
    """Run the work units of this rank (unit i goes to rank i % world.size): `compute(unit)` gives the arrays kept
    in folder/shard-<i>.npz, written atomically with a stamp of `key` and the unit. A unit whose file carries the
    same stamp is skipped. Returns every unit's shard once every rank is done (a barrier)."""
    shards = stamped_shards(folder, units, key)
    computed = kept = 0
    for i in progress(range(world.rank, len(units), world.size), desc, enabled=world.main):
        path, stamp = shards[i]
        if _stamp(path) == stamp:
            kept += 1
            continue
        write_shard(shards[i], compute(units[i]))
        computed += 1
    print(f"rank {world.rank}/{world.size} {desc}: {computed} computed, {kept} kept", file=sys.stderr)
    world.barrier()
    return shards


def write_shard(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
    """A unit's arrays as its shard file, with its stamp, atomically."""
    with atomic_path(shard.path) as tmp, open(tmp, "wb") as f:
        np.savez(f, stamp=np.array(shard.stamp), **arrays)


def stamped_shards(folder: str | os.PathLike, units: list[dict], key: dict) -> list[Shard]:
    """Every unit's shard file and the stamp it must carry."""
    return [Shard(shard_path(Path(folder), i), json.dumps({**key, "unit": unit}, sort_keys=True))
            for i, unit in enumerate(units)]


def pending_units(shards: list[Shard], world: World) -> list[int]:
    """The units of this rank whose shard is not done yet (no file carrying its stamp)."""
    return [i for i in range(world.rank, len(shards), world.size) if _stamp(shards[i].path) != shards[i].stamp]


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _stamp(path: Path) -> str | None:
    try:
        return str(read_npz(path, "shard", names=("stamp",))["stamp"])  # the samples are read at the merge
    except (QandcError, KeyError):
        return None


def require_shards_here(shards: list[Shard], world: World) -> None:
    """Fail on every rank together (so that no torchrun agent waits for a failed one) when rank 0 lacks a shard
    file: ranks on hosts that share no folder wrote theirs elsewhere."""
    missing = world.broadcast([str(path) for path, _ in shards if not path.exists()] if world.main else None)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QandcError(f"{missing[0]}: missing{more}; {SHARDS_ELSEWHERE}")


def read_shard(shard: Shard, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of one shard; a missing file, or one whose stamp is not its shard's (another job's work),
    is a QandcError."""
    path, stamp = shard
    if not path.exists():
        raise QandcError(f"{path}: missing; {SHARDS_ELSEWHERE}")
    data = read_npz(path, "shard", names=(*names, "stamp"))
    missing = [name for name in (*names, "stamp") if name not in data]
    if missing:
        raise QandcError(f"{path}: not a readable shard (no {', '.join(missing)})")
    if str(data["stamp"]) != stamp:
        raise QandcError(f"{path}: a shard made with other settings (another job's); it is recomputed on a rerun")
    return {name: data[name] for name in names}


def merge_shards(shards: list[Shard], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of the shards, concatenated in order, in memory (`write_merged` streams them to a file)."""
    parts = [read_shard(shard, names) for shard in shards]
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


def write_merged(shards: list[Shard], names: tuple[str, ...], rows: int, path: str | os.PathLike,
                 head: int = 0) -> dict[str, np.ndarray]:
    """Write the arrays `names` of the shards, concatenated in order (`rows` rows in all), as the .npz `path`
    (atomically, uncompressed, readable by np.load), holding one shard's array at a time, never all of them.
    Returns the first `head` rows of each array."""
    heads = {}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name in names:
            written, kept, layout = 0, [], None
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                for shard in shards:
                    array = np.ascontiguousarray(read_shard(shard, (name,))[name])
                    if layout is None:
                        layout = (array.shape[1:], array.dtype)
                        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                                  "shape": (rows, *array.shape[1:])}
                        np.lib.format.write_array_header_1_0(f, header)
                    elif (array.shape[1:], array.dtype) != layout:
                        raise QandcError(f"{shard.path}: {name} of shape {array.shape} {array.dtype}, other shards "
                                         f"hold rows of {layout[0]} {layout[1]}")
                    f.write(array.data)
                    written += len(array)
                    if written - len(array) < head:
                        kept.append(array[:head - written + len(array)].copy())
            if written != rows:
                raise QandcError(f"the shards in {shards[0].path.parent} hold {written} rows of {name}, not {rows}")
            heads[name] = np.concatenate(kept) if kept else np.empty((0, *layout[0]), layout[1])
    return heads
