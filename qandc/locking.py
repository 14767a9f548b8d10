"""An output folder belongs to one job at a time: `output_lock(folder, command, world)` holds OUT/.qandc.lock.

The lock is `fcntl.flock` on that file, not a file created with O_CREAT|O_EXCL: the kernel drops a flock when
its holder dies, SIGKILL included, so on one host a lock is never stale and taking over a dead job's file is
atomic — an O_EXCL file would have to be judged stale by probing its pid and then removed and recreated, two
steps another job can interleave with. The file carries the holder's record (host, pid, command, start time) for
the message a second job gets; it is removed when the lock is released. Under torchrun rank 0 holds the lock for
the job and tells the other ranks whether it got it, so every rank fails with the same line.

Network filesystems: Linux turns a flock on NFS into an NFS byte-range lock, which NFSv4 (and NFSv3 with lockd)
enforces between hosts; the server frees a dead client's lock when its lease runs out (about 90 s). Where locks
stay local to a host (NFS mounted `nolock` or `local_lock=all`, Lustre `localflock`, some FUSE and CIFS mounts), a
job on another host is kept out only by the record: a record naming another host is never taken over (a person
must delete the file), but two hosts that start at the same moment are not excluded.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from .distributed import World
from .errors import QandcError

LOCK = ".qandc.lock"
_held: dict[Path, int] = {}  # folders this process's job holds -> nesting depth (`qandc run` holds its stages')


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str, world: World = World()) -> Iterator[None]:
    """Hold `folder` (created if missing) for this job while the block runs: another job's lock is a QandcError
    naming its holder. Folders the lock created are removed again if the block leaves them empty."""
    key = Path(folder).resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    error, taken = None, None
    if world.main:
        try:
            taken = _acquire(Path(folder), command, world.size)
        except QandcError as e:
            error = str(e)
    error = world.broadcast(error)
    if error is not None:
        raise QandcError(error)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if taken is not None:
            _release(Path(folder), *taken)


def holds_output(command: str, param: str = "out"):
    """Decorate a function that writes the folder given as its argument `param`: it runs under `output_lock`
    (taken by rank 0 of its `world` argument, when it has one)."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with output_lock(bound.arguments[param], command, bound.arguments.get("world", World())):
                return function(*args, **kwargs)
        return locked
    return decorate


def _acquire(folder: Path, command: str, ranks: int) -> tuple[int, list[Path]]:
    """Lock `folder`: (the lock file's descriptor, the folders made for it, deepest first)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        return _lock(folder, command, ranks), created
    except QandcError:
        _remove_empty(created)
        raise


def _lock(folder: Path, command: str, ranks: int) -> int:
    path = folder / LOCK
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: never a file elsewhere through a link; O_NONBLOCK: a FIFO put there does not block
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except FileExistsError:
            raise QandcError(f"{folder}: exists and is not a directory") from None
        except FileNotFoundError:  # a job that released the folder removed it as it was made: make it again
            continue
        except OSError as e:
            raise QandcError(f"{path}: cannot open the output lock ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise QandcError(f"{path}: the output lock is not a regular file; delete it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _record(fd)
            os.close(fd)
            raise QandcError(f"{folder}: in use by {_describe(holder)}; wait for it to end or use another "
                             f"output folder") from None
        except OSError as e:
            os.close(fd)
            raise QandcError(f"{path}: cannot lock the output folder ({e.strerror})") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file as it released the lock: lock the file there now
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "ranks": ranks,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        _take_over(folder, path, _record(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as e:
        path.unlink(missing_ok=True)  # held by this job now: leave nothing behind
        os.close(fd)
        raise QandcError(f"{path}: cannot write the holder record ({e.strerror})") from None
    except QandcError:
        os.close(fd)
        raise
    return fd


def _take_over(folder: Path, path: Path, holder: dict | None) -> None:
    """Check that a record left in the free lock file is a dead job's of this host; say that it is taken over."""
    if holder is None:
        return
    if holder.get("host") != socket.gethostname():
        raise QandcError(f"{folder}: locked by {_describe(holder)}; another host's lock is never taken over: if that "
                         f"job is gone, delete {path}")
    if _alive(holder.get("pid")):  # a filesystem where flock does not hold: the record still does
        raise QandcError(f"{folder}: locked by {_describe(holder)}, still running (this filesystem does not hold "
                         f"the lock); wait for it to end or use another output folder")
    print(f"qandc: {folder}: taking over the lock of {_describe(holder)}, no longer running", file=sys.stderr)


def _release(folder: Path, fd: int, created: list[Path]) -> None:
    """Remove the lock file (while still holding it), unlock, and remove the folders the lock made if empty."""
    try:
        if _same_file(fd, folder / LOCK):
            (folder / LOCK).unlink()
    finally:
        os.close(fd)
    _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for made in created:
        try:
            made.rmdir()
        except OSError:  # not empty (the job's output), or gone
            break


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _record(fd: int) -> dict | None:
    """The holder record in the lock file; None for an empty or damaged one (a holder killed while writing it)."""
    try:
        data = json.loads(os.pread(fd, 65536, 0))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another job (no holder record yet)"
    ranks = f", {holder['ranks']} ranks" if isinstance(holder.get("ranks"), int) and holder["ranks"] > 1 else ""
    return (f"qandc {holder.get('command', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            f"{ranks}, since {holder.get('started', '?')})")
