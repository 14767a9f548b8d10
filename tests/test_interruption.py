"""Interruption: calibrate, export and build-engine are killed (SIGKILL) as each of their files starts being written
(its temporary file appears, or it is replaced); after every kill, each file in the folder is whole (byte-equal to an
uninterrupted run's, or the earlier contents it replaces) and a manifest present holds for its files; a rerun then
leaves exactly the uninterrupted run's files (every run is deterministic here, so byte-equal). Export and
build-engine write into a staging folder beside --out (`qandc.staging`): there the files are watched, and after
every kill --out is still the folder it was before the command started.

Select with `-m interruption` (or leave out with `-m "not interruption"`): subprocesses, about a minute."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from qandc.artifacts import sha256_file
from qandc.calibration.calibrate import POOL_SHARDS
from qandc.locking import LOCK
from qandc.model import save_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")
pytestmark = pytest.mark.interruption

CALIBRATE = ["--preset", "w8a8-int8", "--selector", "random", "--samples", "8", "--pool-samples", "2", "--steps", "4",
             "--clusters", "2", "--vc-samples", "2", "--batch-size", "4", "--cache", "interval=2"]
STAGED = {"export", "build-engine"}  # built in .out.staging, then swapped in whole
FILES = {  # each command's files, in the order it writes them
    "calibrate": ["pool.npz", "pool.json", "selection-random.json", "amax.safetensors", "vc.safetensors",
                  "recipe.json"],
    "export": ["full.onnx", "reuse.onnx", "recipe.json", "amax.safetensors", "manifest.json"],
    "build-engine": ["full.ort.onnx", "reuse.ort.onnx", "manifest.json"],
}
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")  # qandc.artifacts.atomic_path's temporary files
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors writes through a Rust tempfile first


def _argv(command: str, root: Path, out: Path) -> list[str]:
    inputs = {"calibrate": ["--checkpoint", str(root / "m.pt"), *CALIBRATE],
              "export": ["--checkpoint", str(root / "m.pt"), "--recipe", str(root / "calibrate")],
              "build-engine": ["--onnx", str(root / "export")]}[command]
    return [sys.executable, "-m", "qandc", command, *inputs, "--out", str(out)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A checkpoint and each command's uninterrupted output (root/<command>), made in pipeline order; and
    root/stale: a finished export of another cache plan, for an export to overwrite."""
    root = tmp_path_factory.mktemp("interruption")
    save_checkpoint(tiny_model(guidance="all"), root / "m.pt")
    for command in FILES:
        subprocess.run(_argv(command, root, root / command), check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "qandc", "export", "--checkpoint", str(root / "m.pt"), "--cache",
                    "interval=3", "--out", str(root / "stale")], check=True, capture_output=True)
    return root


def _state(path: Path):
    """(inode, mtime) of `path`, None while it is absent (the command may remove it between two looks)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _kill_when_written(argv: list[str], out: Path, names: list[str], also: tuple[Path, ...] = (),
                       timeout: float = 120) -> int:
    """Run argv; SIGKILL it as soon as one of out/`names` starts being written (a new temporary file of it appears)
    or is replaced, or a path of `also` is replaced. Returns the exit code (-SIGKILL when the kill came before the
    command finished)."""
    temporaries = lambda: {p for name in names for p in out.glob(f".{name}.*.tmp")}  # noqa: E731
    states = lambda: [_state(path) for path in (*(out / name for name in names), *also)]  # noqa: E731
    before, temporaries_before = states(), temporaries()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if any(now not in (then, None) for now, then in zip(states(), before)) or temporaries() - temporaries_before:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return process.wait(timeout=timeout)


def _assert_whole(out: Path, versions: dict[str, set[bytes]]) -> None:
    """Every file in `out` is one of the whole versions of its name, or an abandoned temporary file (never read);
    a manifest present holds for every file it lists."""
    for path in out.iterdir():
        if path.is_dir():  # calibrate's resumable pool shards: each one whole (np.load reads it) or a temporary
            assert path.name == POOL_SHARDS, path
            for shard in path.iterdir():
                assert TEMPORARY.fullmatch(shard.name) or len(np.load(shard).files), shard
            continue
        if SAFETENSORS_TEMPORARY.fullmatch(path.name) or path.name == LOCK:  # never read as an artifact: the
            continue  # safetensors temporary is renamed in place; the killed job's lock is taken over by the rerun
        temporary = TEMPORARY.fullmatch(path.name)
        assert temporary and temporary["name"] in versions or path.read_bytes() in versions[path.name], path
    if (out / "manifest.json").exists():
        for name, digest in json.loads((out / "manifest.json").read_text())["files"].items():
            assert sha256_file(out / name) == digest, f"the manifest does not hold for {name}"


@pytest.mark.parametrize("command,start", [("calibrate", None), ("export", "stale"), ("build-engine", None)])
def test_killed_at_every_file_then_rerun_equals_the_uninterrupted_run(root, command, start):
    # beside the reference: the lineage paths, relative to the output folder, are the same
    reference, out = root / command, root / f"{command}-rerun"
    versions = {name: {(reference / name).read_bytes()} for name in FILES[command]}
    if start:  # overwrite a finished folder: its files are whole versions too, until replaced
        shutil.copytree(root / start, out)
        for path in out.iterdir():
            versions[path.name].add(path.read_bytes())
    files, written = FILES[command], out.parent / f".{out.name}.staging" if command in STAGED else out
    # a killed job's lock file stays (the next job takes it over): a folder holding only that holds nothing
    contents = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK} or None \
        if out.exists() else None  # noqa: E731
    old, new = contents(), {name: (reference / name).read_bytes() for name in files}
    for k in range(len(files) - 1):  # a rerun goes further: kill it at the first of files[k:] it writes
        written.mkdir(exist_ok=True)  # to be watched before the command makes it
        # the staging folder lives a moment after its last files: a kill may come as it is swapped in for --out
        also = (out,) if command in STAGED else ()
        assert _kill_when_written(_argv(command, root, out), written, files[k:], also) == -signal.SIGKILL, files[k]
        if written.exists():  # the old folder, whole, when the kill came just after the exchange; gone after
            _assert_whole(written, versions)
        if command in STAGED:  # --out is the old folder or the new one, whole
            assert contents() in (old, new)
    assert subprocess.run(_argv(command, root, out), capture_output=True).returncode == 0
    _assert_whole(out, versions)
    if command in STAGED:  # the killed runs' temporary files went with their staging folders
        assert sorted(p.name for p in out.iterdir()) == sorted(FILES[command])
    for name in FILES[command]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging folder left
