"""qandc.staging: a folder is replaced whole only when its build succeeds; a swap a kill cut short is finished by the
next build; written files honour the umask."""

import json
import os
import stat
import sys

import pytest

from qandc.artifacts import umask, write_json
from qandc.errors import QandcError
from qandc.staging import _exchange, staged_folder


def _artifact(folder, content: str) -> None:
    """A minimal finished artifact: one listed file and the manifest."""
    folder.mkdir()
    (folder / "a.bin").write_text(content)
    (folder / "manifest.json").write_text(json.dumps({"kind": "k", "files": {"a.bin": "x"}}))


def _contents(folder) -> dict:
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_failed_build_leaves_the_old_folder_and_no_staging(tmp_path):
    out = tmp_path / "out"
    _artifact(out, "old")
    before = _contents(out)
    with pytest.raises(QandcError, match="boom"), staged_folder(out, "k") as staging:
        (staging / "a.bin").write_text("new")
        raise QandcError("boom")
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_build_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    _artifact(out, "old")
    with staged_folder(out, "k") as staging:
        (staging / "b.bin").write_text("new")
    assert _contents(out) == {"b.bin": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("whole", [True, False])
def test_a_swap_cut_short_is_finished_by_the_next_build(tmp_path, whole):
    """Killed between moving the old folder aside and moving the new one in: the new one when it is whole (its
    manifest written), else the old one, is put back before the next build starts."""
    out = tmp_path / "out"
    _artifact(tmp_path / ".out.old", "old")
    (tmp_path / ".out.staging").mkdir()
    (tmp_path / ".out.staging" / "a.bin").write_text("new")
    if whole:
        (tmp_path / ".out.staging" / "manifest.json").write_text(json.dumps({"kind": "k", "files": {"a.bin": "y"}}))
    expected = _contents(tmp_path / (".out.staging" if whole else ".out.old"))
    with pytest.raises(QandcError), staged_folder(out, "k"):
        raise QandcError("the next build fails")
    assert _contents(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_two_folders_are_exchanged_in_one_step(tmp_path):
    """The swap that keeps --out present throughout: both folders exist before and after, contents traded."""
    _artifact(tmp_path / "a", "old")
    _artifact(tmp_path / "b", "new")
    before = _contents(tmp_path / "a"), _contents(tmp_path / "b")
    assert _exchange(tmp_path / "a", tmp_path / "b")
    assert (_contents(tmp_path / "b"), _contents(tmp_path / "a")) == before
    with pytest.raises(FileNotFoundError):
        _exchange(tmp_path / "a", tmp_path / "missing")


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
