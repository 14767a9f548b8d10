"""Lineage: what an artifact was made from, as references {"path": relative to the artifact's folder, "sha256"}.

Paths are never absolute, so folders moved together (to another place or machine) keep their references. A reader
verifies a reference before it uses what it names, and refuses a mismatch with one line naming both files. Hashes
are cached per process by (resolved path, size, mtime_ns): a large checkpoint is hashed once however many readers
check it. `confined` keeps the files an artifact lists as its own content inside its folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..artifacts import relative_path, sha256_file
from ..errors import QandcError

_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per process for the same (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def digest(path: str | os.PathLike) -> str | dict:
    """sha256 of a file, or of each file of a directory (a diffusers checkpoint or pipeline folder) by its path in
    the directory."""
    path = Path(path)
    if path.is_dir():
        return {f.relative_to(path).as_posix(): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return file_sha256(path)


def reference(path: str | os.PathLike, folder: str | os.PathLike, sha256: str | dict | None = None) -> dict:
    """The reference from an artifact in `folder` to `path` (hashed unless `sha256` is given)."""
    return {"path": relative_path(path, folder),
            "sha256": digest(path) if sha256 is None else sha256}


def rebase(ref: dict, old: str | os.PathLike, new: str | os.PathLike) -> dict:
    """`ref`, made for an artifact in folder `old`, for one in folder `new`."""
    return reference(Path(old) / ref["path"], new, ref["sha256"])


def is_reference(value) -> bool:
    """Whether `value` is a well-formed reference (a relative path, a digest or digests by name)."""
    if not isinstance(value, dict) or set(value) != {"path", "sha256"} or not isinstance(value["path"], str):
        return False
    sha = value["sha256"]
    digests = sha.values() if isinstance(sha, dict) else [sha]
    return (bool(value["path"]) and "\0" not in value["path"] and not Path(value["path"]).is_absolute()
            and all(isinstance(d, str) for d in digests))


def verify(ref: dict, folder: Path, source: Path, kind: str, required: bool = True) -> Path | None:
    """The path `ref` (of the artifact file `source`, in `folder`) names, its hash verified; None when it is absent
    and not `required`. A mismatch is one line naming both files."""
    path = Path(os.path.normpath(Path(folder) / ref["path"]))
    try:
        found = digest(path) if path.exists() else None
    except OSError as e:  # a name the OS refuses, no permission
        raise QandcError(f"{path}: {kind} named by {source} is not readable ({e.strerror})") from None
    if found is None:
        if required:
            raise QandcError(f"{path}: missing; {source} was made from this {kind} (sha256 "
                             f"{_short(ref['sha256'])})")
        return None
    if found != ref["sha256"]:
        raise QandcError(f"{path}: {kind} changed since {source} was made from it (sha256 {_short(found)}, "
                         f"recorded {_short(ref['sha256'])})")
    return path


def check_recipe_checkpoint(recipe_file: Path, recorded: str, checkpoint: str | os.PathLike) -> None:
    """A recipe (`recipe_file`, calibrated on the checkpoint of sha256 `recorded`) is used with `checkpoint`: one
    line naming both when they differ. A recipe that records none (made from a model in memory) is not checked."""
    if recorded and digest(checkpoint) != recorded:
        raise QandcError(f"{recipe_file}: calibrated on another checkpoint than {checkpoint} (sha256 "
                         f"{_short(digest(checkpoint))}, recorded {_short(recorded)})")


def plain_name(name) -> bool:
    """Whether `name` names a file directly inside a folder (no separator, no parent, not absolute)."""
    return isinstance(name, str) and "\0" not in name and Path(name).name == name and name not in (".", "..")


def confined(folder: str | os.PathLike, name: str) -> Path | None:
    """folder/name when it is a plain name whose real path (symlinks followed) stays inside `folder`; else None."""
    if not plain_name(name):
        return None
    path = Path(folder) / name
    return path if path.resolve().parent == Path(folder).resolve() else None


def _short(sha) -> str:
    return sha[:12] if isinstance(sha, str) else "of a directory"
