"""Hostile inputs of two classes, as a catalogue run through the real CLI:
- lineage: an artifact used with inputs other than those it was made from, or moved with them to another place;
- outside: manifests naming files outside their folder (parent paths, absolute paths, symlinks).

Each case says what it does and what must hold: `refuse` (exit 2, one error line naming the files given),
`works` (exit 0) or `no-read` (exit 0 or one clear line). Every case also requires: no traceback, every input file
unchanged (sha256 before and after), nothing written on a refusal, and the file `secret` beside the artifacts never
opened (Python's audit hook sees every open of a Python-level reader; ONNX Runtime and safetensors read in native
code, which the hook cannot see). `python tests/test_hostile_lineage.py` prints the tallies."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_model

from qandc.artifacts import sha256_file
from qandc.cli import main
from qandc.formats import lineage
from qandc.model import save_checkpoint

STEPS = 4
CALIBRATE = ["--preset", "w8a8-int8", "--selector", "random", "--samples", "8", "--pool-samples", "2", "--steps",
             str(STEPS), "--clusters", "2", "--vc-samples", "2", "--batch-size", "4", "--cache", "interval=2"]
TREE = ("m.pt", "m.json", "other.pt", "other.json", "recipe", "onnx", "engines", "engines-ind")
_OPENED: list[Path] | None = None  # paths opened while a case runs


def _audit(event, args):
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(Path(os.fsdecode(args[0])).resolve())


sys.addaudithook(_audit)


def build_tree(root: Path) -> Path:
    """root/orig: m.pt (+ m.json) and its recipe/, onnx/, engines/ (ONNX Runtime) and engines-ind/ (Inductor, on the
    CPU eager), made with the relative paths typed in root/orig; other.pt (+ other.json), another model of the same
    architecture."""
    orig = root / "orig"
    orig.mkdir(parents=True)
    save_checkpoint(tiny_model(guidance="all"), orig / "m.pt")
    save_checkpoint(tiny_model(seed=1, guidance="all"), orig / "other.pt")
    cwd = os.getcwd()
    os.chdir(orig)
    try:
        for argv in (["calibrate", "--checkpoint", "m.pt", *CALIBRATE, "--out", "recipe"],
                     ["export", "--checkpoint", "m.pt", "--recipe", "recipe", "--out", "onnx"],
                     ["build-engine", "--onnx", "onnx", "--out", "engines"],
                     ["build-engine", "--backend", "inductor", "--onnx", "onnx", "--out", "engines-ind"]):
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return orig


# Changes to a copy of the tree (folder t): path -> None.

def edit_json(change):
    return lambda path: path.write_text(json.dumps(change(json.loads(path.read_text()))))


def rehash(path: Path) -> None:
    """Make the manifest beside `path` list its current checksum."""
    edit_json(lambda m: {**m, "files": {**m["files"], path.name: sha256_file(path)}})(path.parent / "manifest.json")


def point_checkpoint(target: str):
    """The manifest names `target` as its checkpoint (in whichever field this qandc keeps it)."""
    def change(m):
        if "checkpoint" in m:
            m["checkpoint"] = target
        if isinstance(m["lineage"].get("checkpoint"), dict):
            m["lineage"]["checkpoint"]["path"] = target
        return m
    return edit_json(change)


def replace_checkpoint(t: Path) -> None:
    shutil.copyfile(t / "other.pt", t / "m.pt")


def symlink_to_secret(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent.parent.parent / "secret")


def _generate(engines: str, *extra) -> list[str]:
    return ["generate", "--engines", engines, "--labels", "1", "--steps", str(STEPS), *extra, "--out", "out"]


@dataclass
class Case:
    name: str
    kind: str             # "lineage" or "outside"
    does: str             # what the case does
    argv: list[str]       # run in the copy's folder t (or moved/t when `moved`)
    expect: str           # "refuse", "works" or "no-read"
    change: object = None  # t -> None, before the command
    names: tuple = ()     # refuse: paths (relative to the run folder) the line names
    problem: str = ""     # refuse: regex of the problem
    moved: bool = False   # the tree is moved to another folder and the original made absent


CASES = [
    Case("recipe-other-checkpoint-generate", "lineage", "generate --recipe with another checkpoint than calibrated",
         ["generate", "--checkpoint", "other.pt", "--recipe", "recipe", "--labels", "1", "--steps", str(STEPS),
          "--out", "out"], "refuse", names=("recipe/recipe.json", "other.pt"), problem="another checkpoint"),
    Case("recipe-other-checkpoint-export", "lineage", "export --recipe with another checkpoint than calibrated",
         ["export", "--checkpoint", "other.pt", "--recipe", "recipe", "--out", "out"], "refuse",
         names=("recipe/recipe.json", "other.pt"), problem="another checkpoint"),
    Case("calibrate-resume-other-checkpoint", "lineage", "calibrate resumed in a recipe folder with another checkpoint",
         ["calibrate", "--checkpoint", "other.pt", *CALIBRATE, "--out", "recipe"], "refuse",
         names=("recipe/recipe.json", "other.pt"), problem="another checkpoint"),
    Case("export-checkpoint-changed-inductor", "lineage", "the export's checkpoint replaced, then an Inductor build",
         ["build-engine", "--backend", "inductor", "--onnx", "onnx", "--out", "out"], "refuse", replace_checkpoint,
         ("m.pt", "onnx/manifest.json"), "changed"),
    Case("engines-checkpoint-changed-nan-fallback", "lineage", "the engines' checkpoint replaced, then --nan-fallback",
         _generate("engines", "--nan-fallback"), "refuse", replace_checkpoint, ("m.pt", "engines/manifest.json"),
         "changed"),
    Case("engines-export-changed", "lineage", "the export the engines were built from rewritten, then generate",
         _generate("engines"), "refuse", lambda t: edit_json(lambda m: {**m, "versions": {}})(t / "onnx/manifest.json"),
         ("onnx/manifest.json", "engines/manifest.json"), "changed"),
    Case("export-recipe-changed", "lineage", "the recipe an export was made from rewritten, then build-engine",
         ["build-engine", "--onnx", "onnx", "--out", "out"], "refuse",
         lambda t: edit_json(lambda r: {**r, "pool_id": "x"})(t / "recipe/recipe.json"),
         ("recipe/recipe.json", "onnx/manifest.json"), "changed"),
    Case("export-recipe-copy-differs", "lineage", "the export's copy of the recipe edited (checksum listed again)",
         ["build-engine", "--onnx", "onnx", "--out", "out"], "refuse",
         lambda t: (edit_json(lambda r: {**r, "pool_id": "x"})(t / "onnx/recipe.json"), rehash(t / "onnx/recipe.json")),
         ("onnx/manifest.json",), "recipe"),
    Case("moved-inductor-build-no-sidecar", "lineage", "the folders moved together (no sidecar), an Inductor build",
         ["build-engine", "--backend", "inductor", "--onnx", "onnx", "--out", "out"], "works",
         lambda t: (t / "m.json").unlink(), moved=True),
    Case("moved-nan-fallback-no-sidecar", "lineage", "the folders moved together (no sidecar), --nan-fallback",
         _generate("engines-ind", "--nan-fallback"), "works", lambda t: (t / "m.json").unlink(), moved=True),
    Case("moved-generate-engines", "lineage", "the folders moved together, generate --engines",
         _generate("engines"), "works", moved=True),
    Case("lineage-checkpoint-absolute", "outside", "the export names an absolute checkpoint path (a secret)",
         ["build-engine", "--backend", "inductor", "--onnx", "onnx", "--out", "out"], "refuse",
         lambda t: point_checkpoint(str(t.parent / "secret"))(t / "onnx/manifest.json"), ("onnx/manifest.json",),
         "absolute"),
    Case("inspect-lineage-not-opened", "outside", "inspect of an export naming ../../secret as its checkpoint",
         ["inspect", "onnx"], "no-read", lambda t: point_checkpoint("../../secret")(t / "onnx/manifest.json")),
    Case("ort-build-lineage-not-opened", "outside", "an ONNX Runtime build of an export naming ../../secret",
         ["build-engine", "--onnx", "onnx", "--out", "out"], "no-read",
         lambda t: point_checkpoint("../../secret")(t / "onnx/manifest.json")),
    Case("inspect-config-files-absolute", "outside", "inspect of a config.json listing the secret's absolute path",
         ["inspect", "cfg"], "no-read",
         lambda t: ((t / "cfg").mkdir(), (t / "cfg/config.json").write_text(json.dumps(
             {"files": {str(t.parent / "secret"): "0" * 64}})))),
    Case("inspect-eval-files-parent", "outside", "inspect of an eval.json listing ../../secret",
         ["inspect", "cfg"], "no-read",
         lambda t: ((t / "cfg").mkdir(), (t / "cfg/eval.json").write_text(json.dumps(
             {"files": {"../../secret": "0" * 64}})))),
    Case("inspect-manifest-files-parent", "outside", "inspect of an export manifest listing ../../secret",
         ["inspect", "onnx"], "no-read",
         lambda t: edit_json(lambda m: {**m, "files": {**m["files"], "../../secret": "0" * 64}})(
             t / "onnx/manifest.json")),
    Case("inspect-manifest-file-symlink", "outside", "inspect of an export whose full.onnx links to the secret",
         ["inspect", "onnx"], "no-read", lambda t: symlink_to_secret(t / "onnx/full.onnx")),
    Case("engines-file-symlink", "outside", "generate --engines whose full engine links to the secret",
         _generate("engines"), "refuse",
         lambda t: symlink_to_secret(t / "engines" / json.loads((t / "engines/manifest.json").read_text())[
             "engines"]["full"]), ("engines/",), "outside"),
]


def _snapshot(folder: Path) -> dict:
    return {p: (sha256_file(p) if p.is_file() else None) for p in folder.rglob("*")}


def run_case(case: Case, orig: Path, tmp: Path) -> tuple[str, str]:
    """Run `case` on a copy of the tree in `tmp`: (outcome, detail); outcome is "clear" when everything the case
    requires holds, else the first failure of: traceback, read outside, data lost, silent bad data, unclear."""
    global _OPENED
    t = tmp / "t"
    t.mkdir(parents=True)
    for name in TREE:
        (shutil.copytree if (orig / name).is_dir() else shutil.copy2)(orig / name, t / name)
    (tmp / "secret").write_text("not yours")
    if case.change:
        case.change(t)
    hidden = None
    if case.moved:  # another machine: the tree elsewhere, the original paths gone
        shutil.move(t, tmp / "moved" / "t")
        t = tmp / "moved" / "t"
        hidden = orig.with_name("orig-away")
        orig.rename(hidden)
    before = _snapshot(tmp)
    cwd, err = os.getcwd(), io.StringIO()
    os.chdir(t)
    _OPENED = []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(case.argv)
            except SystemExit as e:
                code = e.code
    except Exception as e:  # noqa: BLE001  anything but a QandcError escaping main: a traceback
        return "traceback", f"{type(e).__name__}: {e}"
    finally:
        opened, _OPENED = _OPENED, None
        os.chdir(cwd)
        if hidden:
            hidden.rename(orig)
    lines = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"qandc( [\w-]+)?: error: ", line)]
    if (tmp / "secret").resolve() in opened:
        return "read outside", "the secret was opened"
    after = _snapshot(tmp)
    if any(after.get(p, "gone") != digest for p, digest in before.items()):
        return "data lost", "an input file changed or vanished"
    if case.expect == "refuse" and code == 0:
        return "silent bad data", "exit 0"
    if case.expect == "works":
        return ("clear", "") if code == 0 else ("unclear", errors[-1] if errors else f"exit {code}")
    one_line = code == 2 and len(errors) == 1 and errors[0] == lines[-1]
    if case.expect == "no-read":
        return ("clear", "") if code == 0 or one_line else ("unclear", f"exit {code}: {lines[-1:]}")
    named = all(str(Path(n)) in errors[0] for n in case.names) if one_line else False
    if not (one_line and named and re.search(case.problem, errors[0]) and set(after) == set(before)):
        return "unclear", errors[0] if errors else f"exit {code}"
    return "clear", ""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.torch.quantization")
    return build_tree(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tree, tmp_path):
    assert run_case(case, tree, tmp_path) == ("clear", "")


def test_artifacts_name_their_inputs_by_relative_path(tree):
    """No JSON an artifact holds names an absolute path: the folders can move together."""
    for path in tree.rglob("*.json"):
        assert str(tree) not in path.read_text() and str(tree.parent) not in path.read_text(), path
    manifest = json.loads((tree / "engines-ind/manifest.json").read_text())
    assert manifest["lineage"]["checkpoint"] == {"path": "../m.pt", "sha256": sha256_file(tree / "m.pt")}
    assert manifest["lineage"]["export"]["path"] == "../onnx/manifest.json"
    assert json.loads((tree / "recipe/recipe.json").read_text())["checkpoint"] == "../m.pt"


def test_a_checkpoint_is_hashed_once_per_process(tree, tmp_path, monkeypatch):
    """generate --recipe checks the recipe's checkpoint and records its sha256 in config.json: hashed once."""
    hashed = []
    monkeypatch.setattr(lineage, "_HASHES", {})
    monkeypatch.setattr(lineage, "sha256_file", lambda path: hashed.append(Path(path)) or sha256_file(path))
    monkeypatch.chdir(tree)
    assert main(["generate", "--checkpoint", "m.pt", "--recipe", "recipe", "--labels", "1", "--steps", str(STEPS),
                 "--out", str(tmp_path / "out")]) == 0
    assert hashed.count((tree / "m.pt").resolve()) == 1
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["checkpoint_sha256"] == sha256_file(tree / "m.pt")


if __name__ == "__main__":
    import collections
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        orig = build_tree(Path(root))
        tally = collections.Counter()
        for i, case in enumerate(CASES):
            outcome, detail = run_case(case, orig, Path(root) / f"case{i}")
            tally[outcome] += 1
            print(f"{case.kind:8} {case.name:42} {outcome:16} {detail[:150]}")
        print(f"cases {len(CASES)}: " + ", ".join(f"{k} {tally[k]}" for k in
                                                  ("clear", "traceback", "data lost", "silent bad data",
                                                   "read outside", "unclear")))
