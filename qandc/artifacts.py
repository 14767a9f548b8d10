"""Artifact files: every file qandc writes appears whole or not at all; every file it reads is checked, damage or a
foreign file being a one-line QandcError."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Iterator

ASSETS = Path(__file__).resolve().parent / "assets"  # shipped weights: the reference DiT and classifier
PROJECT = ASSETS.parent.parent  # the source tree; records name paths in it relative to it


def portable_path(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> str:
    """`path` as records keep it, true on any machine: a relative path as given; an absolute one relative to the
    project when inside it, as $OUT/... when inside `folder` (the artifact's folder), else as <elsewhere>/NAME."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    path = path.resolve()
    if path.is_relative_to(PROJECT):
        return str(path.relative_to(PROJECT))
    if folder is not None and path.is_relative_to(Path(folder).resolve()):
        return str(Path("$OUT") / path.relative_to(Path(folder).resolve()))
    return f"<elsewhere>/{path.name}"


def relative_path(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` relative to `folder` (both resolved), as an artifact in `folder` records what it was made from: true
    wherever the two move together."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def portable_command(words: list[str], folder: str | os.PathLike | None = None) -> str:
    """The command line `words` (as typed: the program, then its arguments) with every absolute path (also after
    `--option=`) made portable."""
    def portable(word: str) -> str:
        option, equals, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
        return option + equals + (portable_path(value, folder) if os.path.isabs(value) else value)

    return " ".join(map(portable, words))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    with write_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with write_errors_named(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp made it 0600, and a writer may have replaced it
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process umask, read from /proc where it tells it (os.umask can only read it by setting it, which races
    with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def write_errors_named(path: Path) -> Iterator[None]:
    """A full disk, a file size limit or a folder that cannot be written, while writing `path`: a one-line
    QandcError naming it. Writers that hide the OSError (torch.save, safetensors; ONNX Runtime, whose failure to
    save reads as a bad model) are judged by the folder: no space left, or not writable."""
    from .errors import QandcError

    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise QandcError(f"{path}: cannot be written ({e.strerror})") from None
    except Exception:
        cause = _unwritable(path.parent)
        if cause is None:
            raise
        raise QandcError(f"{path}: cannot be written ({cause})") from None


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written into `folder` now (no space left, not writable), or None."""
    try:
        if os.statvfs(folder).f_bavail == 0:
            return os.strerror(errno.ENOSPC)
    except OSError:
        return None
    return None if os.access(folder, os.W_OK) else os.strerror(errno.EACCES)


def write_json(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, missing: str = "missing", max_bytes: int | None = None) -> dict:
    """The JSON object in `path`; a missing, unreadable, non-regular or oversized file (over `max_bytes`, default
    readers.JSON_MAX_BYTES), invalid or too deeply nested JSON or another JSON value is a one-line QandcError (every
    JSON file qandc reads holds an object)."""
    from .errors import QandcError
    from .readers import JSON_MAX_BYTES, parse_json, read_bytes

    path = Path(path)
    data = parse_json(path, read_bytes(path, max_bytes or JSON_MAX_BYTES, missing))
    if not isinstance(data, dict):
        raise QandcError(f"{path}: holds a JSON {type(data).__name__}, not the JSON object expected")
    return data


def read_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file (a regular one: a FIFO or device is refused); a missing or damaged file is a
    one-line QandcError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import QandcError
    from .readers import open_regular

    with open_regular(path):  # opened here first: safetensors says "No such file" of a file it may not read
        pass
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else repr(e)
        raise QandcError(f"{path}: not readable safetensors ({detail})") from None


def mistyped(cls, data: dict) -> list[str]:
    """The fields of dataclass `cls` whose value in `data` does not have the annotated type, as JSON gives it
    (an int is a float, a bool is not an int)."""
    hints = typing.get_type_hints(cls)
    return [name for name, value in data.items() if name in hints and not is_a(value, hints[name])]


def is_a(value, hint) -> bool:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(is_a(value, h) for h in args)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return isinstance(value, origin) and (origin is not list or not args or all(is_a(v, args[0]) for v in value))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file's bytes."""
    from .readers import open_regular

    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict:
    """The versions config and eval records carry."""
    import platform

    import numpy as np
    import torch

    from . import __version__

    return {"qandc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
