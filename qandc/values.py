"""Checks of the numbers users give — CLI arguments (as argparse types) and the dataclasses library users fill —
each a one-line error naming the argument or field, before any work.

One check per kind: `integer` (whole numbers within bounds, below 2**63), `real` (finite floats, optionally
within bounds). `check` applies one to a named value (a QandcError); `argument` makes it an argparse type.
`output_folder` and `output_file` are argparse types for where a command writes: refused before any work when it
is empty, a file (a folder), a dangling link, under a file, or not writable."""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path
from typing import Callable

from .errors import QandcError

INT_LIMIT = 2 ** 63  # seeds and counts stay below it: torch generators take 64-bit signed seeds


def integer(value, minimum: int = 1, maximum: int = INT_LIMIT - 1) -> int:
    """`value` as an int within [minimum, maximum] (at most 2**63 - 1); ValueError saying what is wrong otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        largest = "2**63 - 1" if maximum == INT_LIMIT - 1 else maximum
        raise ValueError(f"must be an integer from {minimum} to {largest}, got {value}")
    return int(value)


def real(value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """`value` as a finite float within [low, high] ((low, high] with `low_open`); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        if high is None:
            bound = f"{'above' if low_open else 'at least'} {low:g}"
        else:
            bound = f"between {low:g} and {high:g}" + (f" (not {low:g})" if low_open else "")
        raise ValueError(f"must be {bound}, got {value:g}")
    return value


def check(name: str, kind: Callable, value, **bounds):
    """kind(value, **bounds), a QandcError naming `name` when it does not hold."""
    try:
        return kind(value, **bounds)
    except ValueError as e:
        raise QandcError(f"{name} {e}") from None


def argument(kind: Callable, **bounds) -> Callable[[str], object]:
    """An argparse type: the text parsed as the kind's number, then checked (argparse names the argument)."""
    def parse(text: str):
        try:
            number = int(text) if kind is integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is integer else 'a number'}, got "
                                             f"{text!r}") from None
        try:
            return kind(number, **bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind.__name__
    return parse


def output_folder(text: str) -> str:
    """An argparse type for an output folder: an existing writable folder, or one that can be created."""
    _not_empty(text)
    path = Path(text)
    _not_dangling(path, text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    _writable(path, text)
    return text


def output_file(text: str) -> str:
    """An argparse type for an output file (written beside and renamed onto): not a folder, in a folder that is
    writable or can be created."""
    _not_empty(text)
    path = Path(text)
    _not_dangling(path, text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    _writable(path.parent, text)
    return text


def _not_empty(text: str) -> None:
    if not text.strip():  # Path("") is the working directory: writing there was never what was asked
        raise argparse.ArgumentTypeError("an empty path")


def _not_dangling(path: Path, text: str) -> None:
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: a symbolic link to {os.readlink(path)}, which does not exist")


def _writable(folder: Path, text: str) -> None:
    """`folder`, or the nearest folder above it that exists, is a writable directory (where it is missing, it can
    be created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        _not_dangling(existing, text)
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: not writable ({existing}: no write permission or a read-only "
                                         "file system)")
