"""Hostile cases of the class "outputs over inputs", and file modes: a catalogue run through the real CLI.

Each case copies the good artifacts (checkpoint, recipe, export, engines, samples) into its own folder, runs one
command and classifies what happened: `clear` (exit 2, one error line naming the path asked for, every file there
before unchanged, nothing new), `data lost` (a file there before changed or vanished), `traceback` (an exception
other than the one-line error), `silent bad data` (the command succeeded, or failed leaving new files behind),
`unclear` (exit 2 without naming the path). Every case must be `clear`; `UMASK_CASES` must write files whose mode
is what the umask gives."""

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from qandc.artifacts import sha256_file
from qandc.cli import main
from test_bad_inputs import CALIBRATE, STEPS, art, rehashed, write  # noqa: F401 (art: the fixture)

pytest.importorskip("onnxruntime")


@dataclass
class Case:
    """`argv(a)`: the command on the copied artifacts `a`; `named(a)`: the path its one error line must name."""
    cls: str
    argv: Callable[[Path], list[str]]
    named: Callable[[Path], Path]
    setup: Callable[[Path], None] = lambda a: None


def _build(a: Path, out: Path) -> list[str]:
    return ["build-engine", "--onnx", str(a / "onnx"), "--out", str(out)]


def _export(a: Path, out: Path) -> list[str]:
    return ["export", "--checkpoint", str(a / "m.pt"), "--recipe", str(a / "recipe"), "--out", str(out)]


def _generate(a: Path, out: Path, *source) -> list[str]:
    return ["generate", *(source or ("--checkpoint", str(a / "m.pt"))), "--labels", "1", "--steps", str(STEPS),
            "--out", str(out)]


def _calibrate(a: Path, out: Path) -> list[str]:
    return ["calibrate", "--checkpoint", str(a / "m.pt"), *CALIBRATE, "--out", str(out)]


def _eval(a: Path, out: Path, *extra) -> list[str]:
    return ["eval", "--samples", str(a / "s.npz"), *extra, "--out", str(out)]


def _user_files(folder: Path):
    def setup(a):
        (a / folder).mkdir(parents=True, exist_ok=True)
        (a / folder / "notes.txt").write_text("mine")
    return setup


def _plan(a: Path) -> Path:
    return a / "p" / "plan.json"


def _pngs(a: Path) -> None:
    (a / "pngs").mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(a / "pngs" / f"{i}_0.png")


OUTPUTS = "outputs over inputs"
CASES = {
    "build-engine-out-is-its-export": Case(OUTPUTS, lambda a: _build(a, a / "onnx"), lambda a: a / "onnx"),
    "build-engine-out-is-another-export": Case(
        OUTPUTS, lambda a: _build(a, a / "onnx2"), lambda a: a / "onnx2",
        lambda a: shutil.copytree(a / "onnx", a / "onnx2")),
    "build-engine-out-is-a-recipe": Case(OUTPUTS, lambda a: _build(a, a / "recipe"), lambda a: a / "recipe"),
    "build-engine-out-inside-its-export": Case(OUTPUTS, lambda a: _build(a, a / "onnx" / "e"), lambda a: a / "onnx"),
    "build-engine-out-holds-its-export": Case(OUTPUTS, lambda a: _build(a, a), lambda a: a),
    "build-engine-out-holds-user-files": Case(OUTPUTS, lambda a: _build(a, a / "mine"), lambda a: a / "mine" /
                                              "notes.txt", _user_files(Path("mine"))),
    "build-engine-out-engines-with-a-foreign-file": Case(
        OUTPUTS, lambda a: _build(a, a / "engines"), lambda a: a / "engines" / "notes.txt",
        _user_files(Path("engines"))),
    "build-engine-out-is-a-link-to-its-export": Case(
        OUTPUTS, lambda a: _build(a, a / "link"), lambda a: a / "onnx", lambda a: (a / "link").symlink_to(a / "onnx")),
    "build-engine-out-is-a-file": Case(OUTPUTS, lambda a: _build(a, a / "m.pt"), lambda a: a / "m.pt"),
    "build-engine-failed-rebuild-keeps-the-old-engines": Case(
        OUTPUTS, lambda a: _build(a, a / "engines"), lambda a: a / "onnx" / "reuse.onnx",
        lambda a: rehashed(write(b"not a protobuf" * 9))(a / "onnx" / "reuse.onnx")),
    "export-out-is-its-recipe": Case(OUTPUTS, lambda a: _export(a, a / "recipe"), lambda a: a / "recipe"),
    "export-out-inside-its-recipe": Case(OUTPUTS, lambda a: _export(a, a / "recipe" / "o"), lambda a: a / "recipe"),
    "export-out-is-the-checkpoint": Case(OUTPUTS, lambda a: _export(a, a / "m.pt"), lambda a: a / "m.pt"),
    "export-out-holds-the-checkpoint": Case(OUTPUTS, lambda a: _export(a, a), lambda a: a),
    "export-out-is-an-engine-folder": Case(OUTPUTS, lambda a: _export(a, a / "engines"), lambda a: a / "engines"),
    "export-out-holds-user-files": Case(OUTPUTS, lambda a: _export(a, a / "mine"), lambda a: a / "mine" / "notes.txt",
                                        _user_files(Path("mine"))),
    "eval-out-is-its-samples": Case(OUTPUTS, lambda a: _eval(a, a / "s.npz"), lambda a: a / "s.npz"),
    "eval-out-is-its-reference": Case(OUTPUTS, lambda a: _eval(a, a / "r.npz", "--reference", str(a / "r.npz")),
                                      lambda a: a / "r.npz"),
    "eval-out-is-a-png-it-reads": Case(
        OUTPUTS, lambda a: ["eval", "--samples", str(a / "pngs"), "--out", str(a / "pngs" / "9_0.png")],
        lambda a: a / "pngs", _pngs),
    "eval-out-is-an-engine-manifest": Case(OUTPUTS, lambda a: _eval(a, a / "engines" / "manifest.json"),
                                           lambda a: a / "engines"),
    "generate-out-is-its-recipe": Case(
        OUTPUTS, lambda a: _generate(a, a / "recipe", "--checkpoint", str(a / "m.pt"), "--recipe", str(a / "recipe")),
        lambda a: a / "recipe"),
    "generate-out-is-its-engines": Case(OUTPUTS, lambda a: _generate(a, a / "engines", "--engines",
                                                                     str(a / "engines")), lambda a: a / "engines"),
    "generate-out-inside-its-engines": Case(OUTPUTS, lambda a: _generate(a, a / "engines" / "s", "--engines",
                                                                         str(a / "engines")), lambda a: a / "engines"),
    "generate-out-holds-its-cache-plan": Case(
        OUTPUTS, lambda a: _generate(a, a / "p", "--checkpoint", str(a / "m.pt"), "--cache", str(_plan(a))),
        _plan, lambda a: (a / "p").mkdir() or _plan(a).write_text('{"interval": 2}')),
    "generate-out-is-an-export": Case(OUTPUTS, lambda a: _generate(a, a / "onnx"), lambda a: a / "onnx"),
    "generate-out-is-the-checkpoint": Case(OUTPUTS, lambda a: _generate(a, a / "m.pt"), lambda a: a / "m.pt"),
    "calibrate-out-is-an-export": Case(OUTPUTS, lambda a: _calibrate(a, a / "onnx"), lambda a: a / "onnx"),
    "calibrate-out-is-an-engine-folder": Case(OUTPUTS, lambda a: _calibrate(a, a / "engines"), lambda a: a / "engines"),
    "calibrate-out-is-the-checkpoint": Case(OUTPUTS, lambda a: _calibrate(a, a / "m.pt"), lambda a: a / "m.pt"),
    "run-out-is-an-engine-folder": Case(
        OUTPUTS, lambda a: ["run", "--checkpoint", str(a / "m.pt"), *CALIBRATE, "--out", str(a / "engines")],
        lambda a: a / "engines"),
}


def _tree(folder: Path) -> dict[Path, str | None]:
    """Every path under `folder`: a file's sha256, None for a folder."""
    return {p: sha256_file(p) if p.is_file() else None for p in folder.rglob("*")}


def _copy_art(art: Path, a: Path) -> None:  # noqa: F811 (art: the fixture's folder)
    """The good artifacts, and samples s.npz and r.npz, in `a`."""
    for name in ("m.pt", "m.json", "recipe", "onnx", "engines"):
        (shutil.copytree if (art / name).is_dir() else shutil.copyfile)(art / name, a / name)
    rng = np.random.default_rng(0)
    for name in ("s.npz", "r.npz"):
        np.savez(a / name, images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), labels=np.arange(4))


def outcome(case: Case, a: Path, capsys) -> str:
    """What `case` did on the artifacts copied to `a` (see the module's docstring)."""
    case.setup(a)
    before = _tree(a)
    capsys.readouterr()
    try:
        code = main(case.argv(a))
    except SystemExit as e:  # a usage error: argparse's one line (an --out refused by its argument type)
        code = e.code
    except Exception:  # noqa: BLE001 (what the catalogue counts)
        code = None
    after = _tree(a)
    if any(after.get(p, "gone") != digest for p, digest in before.items()):
        return "data lost"
    if code is None:
        return "traceback"
    if code == 0 or set(after) != set(before):
        return "silent bad data"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    named = str(case.named(a))
    one_line = len(lines) == 1 and re.match(r"qandc( \S+)?: error: ", lines[0])
    return "clear" if one_line and named in lines[0] else "unclear"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_output(name, art, tmp_path, capsys, monkeypatch):  # noqa: F811 (art: the fixture)
    monkeypatch.chdir(tmp_path)
    a = tmp_path / "a"
    a.mkdir()
    _copy_art(art, a)
    assert outcome(CASES[name], a, capsys) == "clear"


UMASK_CASES = {
    "export": lambda a: _export(a, a / "o"),
    "build-engine": lambda a: _build(a, a / "o"),
    "generate": lambda a: _generate(a, a / "o"),
    "eval": lambda a: _eval(a, a / "o" / "eval.json"),
}


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("command", list(UMASK_CASES))
def test_files_honour_the_umask(command, umask, art, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    a = tmp_path / "a"
    a.mkdir()
    _copy_art(art, a)
    (a / "o").mkdir()
    old = os.umask(umask)
    try:
        assert main(UMASK_CASES[command](a)) == 0
    finally:
        os.umask(old)
    files = [p for p in (a / "o").rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
