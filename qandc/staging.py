"""Outputs apart from inputs, and artifact folders replaced whole.

`check_apart` / `check_file_apart`: an output is none of a command's inputs (resolved paths: the same path, one
inside the other) and no artifact folder of another kind. `staged_folder`: export and build-engine build in
`.<OUT>.staging` beside OUT, the manifest written last, and only then swap it in for OUT: a failed or killed build
leaves OUT as it was, and a rerun restarts from a clean staging folder (finishing a swap a kill cut short first).
On Linux the swap is one atomic exchange of the two folders, so that a reader never finds OUT absent; elsewhere (or
on a file system without it) two renames, which a kill can cut between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .artifacts import read_json
from .errors import QandcError
from .formats.manifest import MANIFEST
from .locking import LOCK

# what marks a folder as an artifact of each kind that has no manifest: files or sub-folders it always holds
MARKERS = {"recipe": ("recipe.json", "pool.json", "pool-shards"), "samples": ("samples.npz", "shards"),
           "run": ("recipe", "onnx", "engines", "samples")}
# files the samples reader takes from a folder (qandc.metrics.evaluate.read_samples)
SAMPLE_FILES = ("samples.npz", "config.json")


def folder_kind(folder: Path) -> str | None:
    """The kind of qandc artifact `folder` holds: its manifest's kind, "recipe", "samples" or "run"; None when
    none."""
    if (folder / MANIFEST).is_file():
        kind = _manifest(folder).get("kind")
        return kind if isinstance(kind, str) else "unreadable-manifest"
    return next((kind for kind, names in MARKERS.items() if any((folder / n).exists() for n in names)), None)


def _manifest(folder: Path) -> dict:
    """The JSON of the manifest in `folder` as it stands, read as every JSON file is (bounded); {} when unreadable."""
    try:
        return read_json(folder / MANIFEST)
    except QandcError:
        return {}


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if source in out.parents:
        return "lies inside"
    return "holds" if out in source.parents else None


def check_apart(out, inputs: dict[str, object], kind: str, flag: str = "--out") -> None:
    """Folder `out` is none of `inputs` (label -> path; empty ones left out), lies inside none and holds none, is
    not a file, and holds no artifact but one of `kind`."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        if path:
            relation = _relation(target, Path(path).resolve())
            if relation:
                raise QandcError(f"{flag} {out}: {relation} {label} {path}; write outputs apart from the inputs")
    if target.exists() and not target.is_dir():
        raise QandcError(f"{flag} {out}: exists and is not a directory")
    found = folder_kind(target) if target.is_dir() else None
    if found not in (None, kind):
        raise QandcError(f"{flag} {out}: holds a qandc artifact of kind {found!r}; this command writes "
                         f"{kind!r} folders: choose another")


def check_file_apart(out, inputs: dict[str, object], flag: str = "--out") -> None:
    """File `out` is none of `inputs` (label -> path) nor a file read from an input folder, and lies in no artifact
    folder but a samples or run folder."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        if not path:
            continue
        source = Path(path).resolve()
        read = target.parent == source and (target.name in SAMPLE_FILES or target.suffix.lower() == ".png")
        if target == source or read:
            raise QandcError(f"{flag} {out}: is {'' if target == source else 'a file read from '}{label} {path}; "
                             "write outputs apart from the inputs")
    found = folder_kind(target.parent) if target.parent.is_dir() else None
    if found not in (None, "samples", "run"):
        raise QandcError(f"{flag} {out}: lies in a qandc artifact of kind {found!r}; write it elsewhere")


def _sibling(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}{suffix}"


def _check_replaceable(out: Path, kind: str) -> None:
    """`out` is new, empty, or a `kind` artifact holding only the files its manifest lists: replacing it whole loses
    nothing else."""
    if not out.is_dir():
        return
    files = _manifest(out).get("files") if (out / MANIFEST).is_file() else None
    listed = {MANIFEST, LOCK} | (set(files) if isinstance(files, dict) else set())
    for entry in sorted(out.iterdir()):
        if entry.name not in listed:
            raise QandcError(f"--out {out}: holds {entry}, which no {kind!r} manifest there lists; the folder "
                             "is replaced whole: move it away or choose another --out")


def _recover(out: Path) -> None:
    """Finish a swap a kill cut short: the new folder (whole: it has its manifest) or else the old one back at
    `out`, and the old one removed."""
    staging, retired = _sibling(out, ".staging"), _sibling(out, ".old")
    if retired.exists():
        if not out.exists():
            os.replace(staging if (staging / MANIFEST).is_file() else retired, out)
        shutil.rmtree(retired, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing folders `a` and `b` in one step: Linux's renameat2(RENAME_EXCHANGE), called through ctypes
    as Python's os has no call for it. False where the C library or the file system has no such exchange."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextlib.contextmanager
def staged_folder(out, kind: str) -> Iterator[Path]:
    """A fresh staging folder beside `out` to build a `kind` artifact in (manifest last); when the block succeeds
    it replaces `out` whole; when it fails it is removed and `out` stays as it was."""
    out = Path(out).resolve()
    _recover(out)
    _check_replaceable(out, kind)
    staging, retired = _sibling(out, ".staging"), _sibling(out, ".old")
    shutil.rmtree(staging, ignore_errors=True)  # a killed build's: restart cleanly
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if (out / LOCK).exists():  # the job's lock goes with the folder (same file: the lock stays held)
        os.replace(out / LOCK, staging / LOCK)
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        os.replace(staging, retired)  # the old folder, whole: a staging folder with a manifest is never half removed
    else:
        os.replace(out, retired)
        os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
