"""Hostile cases of the Concurrency class (issue 13), as a catalogue the tests run through `python -m qandc`: a second
job into an output folder another job holds, two jobs racing into one folder, lock files left behind or planted.
Each case says what it does and what must hold; `outcome` sorts a run into clear / traceback / lost or mixed /
silent bad data / read outside, the figures the issue asks for."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import CALIBRATE, STEPS, art  # noqa: F401 - art: the fixture the tests take

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
LOCK = ".qandc.lock"
HOLDER = """import sys
from qandc.locking import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""
RACE = ["--num-images", "48", "--batch-size", "1", "--steps", "25", "--labels", "1,2"]  # 48 shards: seconds of work
SHORT = ["--num-images", "2", "--steps", "4", "--seed", "0"]


def qandc(*argv, procs: int = 0, log: Path | None = None):
    """`python -m qandc ARGV` (or under torchrun with `procs` CPU processes): the finished run, or with `log` the
    running process, its stderr going to `log`."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"] if procs else ["-m"]
    argv = [sys.executable, *launcher, "qandc", *map(str, argv)]
    if log is None:
        return subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT)
    with open(log, "w") as stderr:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV, cwd=ROOT)


class Holder:
    """Another process holding `folder` for `command` until stopped."""

    def __init__(self, folder: Path, command: str = "generate"):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), command], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        assert self.process.stdout.readline().strip() == "held"
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


def snapshot(*folders: Path) -> dict[Path, str]:
    """sha256 of every file below `folders`."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_fifo()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qandc: error: ")]


def samples_of(folder: Path) -> tuple[np.ndarray, int]:
    """(the samples, config.json's seed) of a generate folder."""
    with np.load(folder / "samples.npz") as data:
        return data["samples"], json.loads((folder / "config.json").read_text())["seed"]


@dataclass
class Case:
    """`run(tmp, art)` does what the case says and returns its Result."""

    name: str
    what: str
    must_hold: str
    run: Callable


@dataclass
class Result:
    traceback: bool = False
    lost_or_mixed: bool = False   # a file it must leave alone changed, or another job's rows in the samples
    silent: bool = False          # exit 0 where the case must be refused, or output that is not the job's own
    read_outside: bool = False    # a file outside the folder opened or changed
    unclear: str = ""             # not one line, exit 2, naming what it must name

    @property
    def outcome(self) -> str:
        for name in ("traceback", "lost_or_mixed", "silent", "read_outside"):
            if getattr(self, name):
                return name
        return "unclear: " + self.unclear if self.unclear else "clear"


def refused(run: subprocess.CompletedProcess, before: dict, after: dict, *named: str, lines: int = 1) -> Result:
    """The Result of a command that must be refused with one line naming `named`, writing nothing."""
    result = Result(traceback="Traceback" in run.stderr, lost_or_mixed=before != after,
                    silent=run.returncode == 0)
    errors = error_lines(run.stderr)
    if run.returncode == 0 or len(errors) != lines or len(set(errors)) != 1:
        result.unclear = f"exit {run.returncode}, {len(errors)} error lines"
    elif not all(name in errors[0] for name in named):
        result.unclear = f"{errors[0]!r} does not name {named}"
    return result


# Held: a second job into a folder another process holds (the lock itself held by a real second process).
def _held(command: Callable[[Path, Path, Path], list]):
    def run(tmp: Path, arts: Path) -> Result:
        folder = tmp / "held"
        folder.mkdir()
        np.savez(folder / "images.npz", images=np.zeros((3, 28, 28), np.uint8))  # eval's samples
        holder = Holder(folder)
        try:
            before = snapshot(tmp, arts)
            done = qandc(*command(tmp, arts, folder))
            after = snapshot(tmp, arts)
        finally:
            holder.stop()
        return refused(done, before, after, str(folder), f"pid {holder.pid}")
    return run


GENERATE = ["--labels", "1", "--steps", str(STEPS)]
HELD = {
    "generate": lambda tmp, arts, f: ["generate", "--checkpoint", arts / "m.pt", *GENERATE, "--out", f],
    "generate-engines": lambda tmp, arts, f: ["generate", "--engines", arts / "engines", *GENERATE, "--out", f],
    "calibrate": lambda tmp, arts, f: ["calibrate", "--checkpoint", arts / "m.pt", *CALIBRATE, "--out", f],
    "export": lambda tmp, arts, f: ["export", "--checkpoint", arts / "m.pt", "--recipe", arts / "recipe",
                                    "--out", f],
    "build-engine": lambda tmp, arts, f: ["build-engine", "--onnx", arts / "onnx", "--out", f],
    "run": lambda tmp, arts, f: ["run", "--checkpoint", arts / "m.pt", *CALIBRATE, "--labels", "1", "--out", f],
    "eval-into-samples-folder": lambda tmp, arts, f: ["eval", "--samples", f / "images.npz"],
    "eval-out-file": lambda tmp, arts, f: ["eval", "--samples", f / "images.npz", "--out", f / "scores.json"],
}


def _held_torchrun(tmp: Path, arts: Path) -> Result:
    """Both ranks must fail with the same line (torchrun adds its own failure report)."""
    folder = tmp / "held"
    holder = Holder(folder)
    try:
        before = snapshot(tmp, arts)
        done = qandc("generate", "--checkpoint", arts / "m.pt", *GENERATE, "--out", folder, procs=2)
        after = snapshot(tmp, arts)
    finally:
        holder.stop()
    done.stderr = "\n".join(line for line in done.stderr.splitlines() if "Traceback" not in line)  # torchrun's
    return refused(done, before, after, str(folder), f"pid {holder.pid}", lines=2)


def signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to process `pid` and its descendants (torchrun's workers are in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    tree = [pid]
    for member in tree:
        tree += [child for child, parent in parents.items() if parent == member]
    for member in tree:
        os.kill(member, signum)


# Race: two real generate jobs into one folder, the second run while the first is paused (SIGSTOP to it and its
# workers) right after its first shard.
def _race(second: list, procs: int = 0):
    def run(tmp: Path, arts: Path) -> Result:
        ckpt = ["generate", "--checkpoint", arts / "m.pt", *RACE]
        assert qandc(*ckpt, "--seed", "0", "--out", tmp / "alone").returncode == 0
        out = tmp / "out"
        first = qandc(*ckpt, "--seed", "0", "--out", out, procs=procs, log=tmp / "first.log")
        while not (out / "shards" / "shard-00000.npz").exists() and first.poll() is None:
            time.sleep(0.002)
        signal_tree(first.pid, signal.SIGSTOP)
        try:
            assert not (out / "samples.npz").exists(), "the first job was done before it could be paused"
            done = qandc(*ckpt, *second, "--out", out)
        finally:
            signal_tree(first.pid, signal.SIGCONT)
        result = refused(done, {}, {}, str(out))
        result.traceback |= first.wait(timeout=600) != 0 or "Traceback" in (tmp / "first.log").read_text()
        samples, seed = samples_of(out)
        result.lost_or_mixed = not np.array_equal(samples, samples_of(tmp / "alone")[0]) or seed != 0
        return result
    return run


# Left or planted lock files: (what the lock path holds, whether the job must run, what the line names).
def _planted(make: Callable[[Path, Path], None], runs: bool, named: Callable[[Path], str] | None = None):
    def run(tmp: Path, arts: Path) -> Result:
        out, outside = tmp / "out", tmp / "outside.txt"
        out.mkdir()
        outside.write_text("not qandc's\n")
        make(out / LOCK, outside)
        before = snapshot(arts, out) | {outside: hashlib.sha256(outside.read_bytes()).hexdigest()}
        done = qandc("generate", "--checkpoint", arts / "m.pt", *SHORT, "--out", out)
        after = snapshot(arts, out) | {outside: hashlib.sha256(outside.read_bytes()).hexdigest()}
        if not runs:
            result = refused(done, before, after, str(named(out / LOCK)))
        else:
            before, after = ({p: h for p, h in s.items() if not p.is_relative_to(out)} for s in (before, after))
            result = Result(traceback="Traceback" in done.stderr, lost_or_mixed=before != after)
            if done.returncode != 0:
                result.unclear = f"exit {done.returncode}: {error_lines(done.stderr)}"
            else:
                reference = tmp / "alone"
                assert qandc("generate", "--checkpoint", arts / "m.pt", *SHORT,
                             "--out", reference).returncode == 0
                result.silent = not np.array_equal(samples_of(out)[0], samples_of(reference)[0])
                result.unclear = "" if not (out / LOCK).exists() else "the lock file stays"
        result.read_outside = after[outside] != before[outside]
        return result
    return run


def _record(host: str, pid: int):
    def make(lock: Path, outside: Path) -> None:
        lock.write_text(json.dumps({"host": host, "pid": pid, "command": "generate", "started": "2026-01-01"}))
    return make


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


CASES = [
    *(Case(f"held-{name}", f"`qandc {command(Path('T'), Path('A'), Path('F'))[0]}` into a folder another process "
           "holds", "exit 2, one line naming the folder and the holder's pid; no file changed", _held(command))
      for name, command in HELD.items()),
    Case("held-generate-torchrun", "`torchrun --nproc-per-node 2 -m qandc generate` into a held folder",
         "every rank exits 2 with the same one line naming the holder; no file changed", _held_torchrun),
    Case("race-generate-other-seed", "a second generate (seed 1) into the folder a first (seed 0) is sampling",
         "the second: one line naming the folder; the first: exit 0, samples exactly its own, config seed 0",
         _race(["--seed", "1"])),
    Case("race-generate-same-settings", "the same generate twice at once into one folder",
         "the second: one line naming the folder; the first: exit 0, samples exactly its own", _race(["--seed", "0"])),
    Case("race-torchrun-then-generate", "a generate into the folder a 2-rank torchrun generate is sampling",
         "the second: one line naming the folder; the torchrun job: exit 0, samples exactly its own",
         _race(["--seed", "1"], procs=2)),
    Case("stale-lock-dead-pid", "a lock record of a process of this host that is gone",
         "taken over: exit 0, samples exactly the job's own, no lock file left", _planted(_record(socket.gethostname(),
                                                                                                 _dead_pid()), True)),
    Case("stale-lock-garbage", "a lock file of binary garbage (a holder killed while writing it)",
         "taken over: exit 0, samples exactly the job's own", _planted(lambda lock, _: lock.write_bytes(b"\0\xff{"),
                                                                       True)),
    Case("lock-of-another-host", "a lock record naming another host (not locked here)",
         "exit 2, one line naming the lock file to delete; the record unchanged",
         _planted(_record("another-host.example", 4242), False, lambda lock: lock)),
    Case("lock-of-a-live-local-process", "a record naming a live process of this host, the file not locked (a "
         "filesystem without flock)", "exit 2, one line naming the folder; the record unchanged",
         _planted(_record(socket.gethostname(), os.getppid()), False, lambda lock: lock.parent)),
    Case("lock-symlink-outside", "the lock path is a symlink to a file outside the folder",
         "exit 2, one line naming the lock file; the file outside neither read nor changed",
         _planted(lambda lock, outside: lock.symlink_to(outside), False, lambda lock: lock)),
    Case("lock-fifo", "the lock path is a FIFO", "exit 2, one line naming the lock file (no hang)",
         _planted(lambda lock, _: os.mkfifo(lock), False, lambda lock: lock)),
    Case("lock-directory", "the lock path is a directory", "exit 2, one line naming the lock file",
         _planted(lambda lock, _: lock.mkdir(), False, lambda lock: lock)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_concurrency_case(case, art, tmp_path):  # noqa: F811 - art is the imported fixture
    result = case.run(tmp_path, art)
    assert result.outcome == "clear", f"{case.name}: {case.must_hold}: {result.outcome}"


def test_the_lock_is_held_once_under_torchrun_by_rank_0(art, tmp_path):  # noqa: F811
    """Rank 0 holds it for the job (were every rank to take it, rank 1 would find rank 0's lock); the record names
    the job's 2 ranks while it runs, and the lock is gone once it ends."""
    out = tmp_path / "out"
    job = qandc("generate", "--checkpoint", art / "m.pt", *RACE, "--out", out, procs=2, log=tmp_path / "log")
    records = set()
    while job.poll() is None:
        try:
            records.add((out / LOCK).read_text())
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    assert job.wait() == 0, (tmp_path / "log").read_text()[-3000:]
    records = [json.loads(r) for r in records if r]
    assert records and {(r["ranks"], r["command"]) for r in records} == {(2, "generate")}
    assert len({r["pid"] for r in records}) == 1 and not (out / LOCK).exists()


def test_merge_refuses_a_shard_of_another_job(tmp_path):
    """A shard file replaced by another job's (its stamp differs) between the run and the merge is refused."""
    from qandc.distributed import World, merge_shards, run_shards
    from qandc.errors import QandcError

    units = [{"ids": [0, 1]}, {"ids": [1, 2]}]
    compute = lambda unit: {"samples": np.full(1, unit["ids"][0], np.float32)}  # noqa: E731
    mine = run_shards(tmp_path / "a", units, compute, World(), {"seed": 0})
    theirs = run_shards(tmp_path / "b", units, compute, World(), {"seed": 1})
    assert merge_shards(mine, ("samples",))["samples"].tolist() == [0, 1]
    os.replace(theirs[1].path, mine[1].path)
    with pytest.raises(QandcError, match=re.escape(f"{mine[1].path}: a shard made with other settings")):
        merge_shards(mine, ("samples",))


def test_a_killed_holder_frees_the_folder(art, tmp_path):  # noqa: F811
    """SIGKILL leaves the lock file; the kernel has dropped the lock, so the next job takes it over."""
    holder = Holder(tmp_path / "out")
    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait()
    assert (tmp_path / "out" / LOCK).exists()
    done = qandc("generate", "--checkpoint", art / "m.pt", *GENERATE, "--out", tmp_path / "out")
    assert done.returncode == 0 and f"taking over the lock of qandc generate (pid {holder.pid}" in done.stderr
