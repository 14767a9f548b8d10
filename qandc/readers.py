"""Bounded reading: every file qandc reads must be a regular file (a FIFO, device or socket is refused before it can
block or stream forever), of bounded size where its kind allows, parsed with bounded depth and memory. Anything else
is a one-line QandcError naming the file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import QandcError

JSON_MAX_BYTES = 16 << 20  # any JSON file qandc reads (manifests, recipes, plans, configs, selections)
SIDECAR_MAX_BYTES = 1 << 20  # a checkpoint's sidecar JSON
JSON_MAX_DEPTH = 32  # nesting of objects and lists; qandc's own files nest 4 deep at most
NPZ_MAX_BYTES = 16 << 30  # the arrays of one .npz, unpacked
ZIP_MAX_RATIO = 200  # unpacked / packed size of a compressed zip member (npz arrays, checkpoint storages): weights,
# images and trajectories pack far less densely; a member expanding more is refused as a bomb (deflate reaches 1032)
IDX_MAX_BYTES = 256 << 20  # one unpacked Fashion-MNIST IDX file (the train images are 47 MB)


def _refuse(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise QandcError(f"{path}: not readable (a directory, not a file)")
    if not stat.S_ISREG(mode):
        raise QandcError(f"{path}: not readable (not a regular file: a FIFO, device or socket is refused)")


def regular_file(path: str | os.PathLike, missing: str = "missing") -> Path:
    """`path`, checked to be a regular file (links followed), for readers that open it themselves."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise QandcError(f"{path}: {missing}") from None
    except (OSError, ValueError) as e:  # no permission, a name the OS refuses
        raise QandcError(f"{path}: not readable ({e.strerror if isinstance(e, OSError) else e})") from None
    _refuse(path, mode)
    return path


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, missing: str = "missing") -> Iterator[BinaryIO]:
    """`path` opened for binary reading, refused unless the opened file is a regular one (opened without blocking,
    so a FIFO is refused, not waited on)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise QandcError(f"{path}: {missing}") from None
    except (OSError, ValueError) as e:
        raise QandcError(f"{path}: not readable ({e.strerror if isinstance(e, OSError) else e})") from None
    try:
        _refuse(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        yield f


def read_bytes(path: str | os.PathLike, max_bytes: int, missing: str = "missing") -> bytes:
    """The bytes of regular file `path`, at most `max_bytes` of them."""
    with open_regular(path, missing) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise QandcError(f"{path}: not readable ({e.strerror})") from None
    if len(data) > max_bytes:
        raise QandcError(f"{path}: more than {max_bytes >> 20} MB, more than a file of its kind may have")
    return data


def json_depth(value) -> int:
    """The nesting depth of a parsed JSON value (a scalar 0), computed without recursion."""
    depth, level = 0, [(value, 0)]
    while level:
        node, d = level.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d + 1)
            level.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def parse_json(path: Path, data: bytes):
    """The JSON value `data` read from `path`; invalid or deeper than JSON_MAX_DEPTH is a QandcError."""
    try:
        value = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QandcError(f"{path}: not valid JSON ({e})") from None
    except (RecursionError, ValueError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise QandcError(f"{path}: not valid JSON (nested too deep)" if isinstance(e, RecursionError) else
                         f"{path}: not valid JSON ({str(e)[:160]})") from None
    if json_depth(value) > JSON_MAX_DEPTH:
        raise QandcError(f"{path}: not valid JSON here (nested deeper than {JSON_MAX_DEPTH} levels)")
    return value


def read_npz(path: str | os.PathLike, what: str, max_bytes: int = NPZ_MAX_BYTES,
             names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive (no pickles); only those in `names` when given (the others are not read).
    Each member's header is checked before its data is read: its declared shape and dtype must fit what the member
    holds, the members together at most `max_bytes` unpacked."""
    with open_regular(path) as f:
        try:
            with zipfile.ZipFile(f) as archive:
                members = archive.infolist()
                _check_npz_sizes(f"{path}: not a readable {what}", members, max_bytes, os.fstat(f.fileno()).st_size)
                arrays = {info.filename.removesuffix(".npy"): info for info in members}
                return {name: _read_npy(f"{path}: not a readable {what}", archive, info)
                        for name, info in arrays.items() if names is None or name in names}
        except (OSError, EOFError, ValueError, TypeError, SyntaxError, zipfile.BadZipFile, zlib.error) as e:
            raise QandcError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:160]})") from None


def refuse_zip_bomb(path: str | os.PathLike, what: str) -> None:
    """Refuse a zip archive (a .pt checkpoint, a torch.export program) with a member that would unpack more than
    ZIP_MAX_RATIO times its packed size; a file that is no readable zip is left to its own reader."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return
    _check_ratios(f"{path}: not a readable {what}", members)


def _check_ratios(refused: str, members: list[zipfile.ZipInfo]) -> None:
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > ZIP_MAX_RATIO * max(info.compress_size, 1):
            raise QandcError(f"{refused} ({info.filename} unpacks {info.compress_size} bytes to {info.file_size}, "
                             f"more than {ZIP_MAX_RATIO} times: refused as a decompression bomb)")


def _check_npz_sizes(refused: str, members: list[zipfile.ZipInfo], max_bytes: int, file_bytes: int) -> None:
    for info in members:
        if not info.filename.endswith(".npy"):
            raise QandcError(f"{refused} (holds {info.filename[:80]!r}, not an array)")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise QandcError(f"{refused} ({info.filename} is stored, yet declares {info.file_size} bytes from "
                             f"{info.compress_size})")
    _check_ratios(refused, members)
    if sum(info.compress_size for info in members) > file_bytes:
        raise QandcError(f"{refused} (its members declare more bytes than the file's {file_bytes})")
    total = sum(info.file_size for info in members)
    if total > max_bytes:
        raise QandcError(f"{refused} ({total >> 20} MB of arrays unpacked, more than the {max_bytes >> 20} MB "
                         "allowed)")


def _read_npy(refused: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member's array, its header checked against the member's size before anything is allocated."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise QandcError(f"{refused} ({info.filename} holds Python objects, not numbers)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise QandcError(f"{refused} ({info.filename} declares shape {shape} of {dtype}, {nbytes} bytes, in "
                             f"{info.file_size} bytes)")
        array = np.empty(shape[::-1] if fortran else shape, dtype)
        view = memoryview(array.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise QandcError(f"{refused} ({info.filename} ends after {got} of its {nbytes} bytes)")
            got += n
    return array.T if fortran else array
