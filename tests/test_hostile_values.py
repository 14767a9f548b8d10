"""Hostile values and environments, as a catalogue: numbers a user types (NaN, inf, negative seeds, eta out of
range), amax and VC values a recipe file holds, torchrun's environment variables, `--out` paths that cannot be
written, a full disk, and Ctrl-C. Each case must end with one error line naming the argument, variable or file,
exit 2 (130 for an interrupt), before any work, with every input byte-equal and nothing half-written.

`outcome` classifies a run (clear, traceback, unclear, silent bad data, data lost); the test asks for `clear` (or
`ok` for the legitimate inputs among the cases)."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config, tiny_model
from qandc.artifacts import sha256_file
from qandc.cli import main
from qandc.errors import QandcError
from qandc.model import DiT, initialize_weights, save_checkpoint
from test_bad_inputs import CALIBRATE, STEPS
from test_bad_inputs import art as _art  # noqa: F401 - the fixture, registered as _art

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")

ERROR = re.compile(r"qandc( [\w-]+)?: error: ")


@pytest.fixture(scope="module")
def art(_art):  # noqa: F811 - pytest passes the imported fixture by its name
    """test_bad_inputs' good artifacts: a checkpoint m.pt, recipe/, onnx/, engines/ and fmnist/."""
    return _art


@dataclass
class Case:
    """One hostile input: `setup(tmp, art)` prepares it and returns the argv; the error line must match `names`
    (the argument, variable or file) and `problem`; `env` is set while it runs; `expect` is "error" or "ok"."""

    name: str
    kind: str  # "values" or "environment"
    does: str
    setup: Callable
    names: str
    problem: str = ""
    env: dict | None = None
    expect: str = "error"
    reference: Callable | None = None  # expect "ok": argv of a run whose samples (tmp/ref) the case's must equal


def _generate(tmp, art, *extra, checkpoint=None):
    return ["generate", "--checkpoint", str(checkpoint or art / "m.pt"), "--labels", "1", "--steps", str(STEPS),
            *extra, "--out", str(tmp / "out")]


def _calibrate(tmp, art, *extra, out=None):
    return ["calibrate", "--checkpoint", str(art / "m.pt"), *CALIBRATE, *extra, "--out", str(out or tmp / "r")]


def _with(flag, value, command=_generate):
    return lambda tmp, art: command(tmp, art, flag, value)


def _recipe(change, file="amax.safetensors", command="generate"):
    """A copy of the art recipe with `file`'s tensors changed by change(tensors), read by `command`."""
    def setup(tmp, art):
        shutil.copytree(art / "recipe", tmp / "recipe")
        save_file(change(load_file(tmp / "recipe" / file)), str(tmp / "recipe" / file))
        if command == "export":
            return ["export", "--checkpoint", str(art / "m.pt"), "--recipe", str(tmp / "recipe"), "--out",
                    str(tmp / "out")]
        return _generate(tmp, art, "--recipe", str(tmp / "recipe"))
    return setup


def _recipe_json(**changes):
    """A copy of the art recipe with recipe.json's fields changed (JSON as Python writes it: NaN included)."""
    def setup(tmp, art):
        shutil.copytree(art / "recipe", tmp / "recipe")
        path = tmp / "recipe" / "recipe.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return _generate(tmp, art, "--recipe", str(tmp / "recipe"))
    return setup


def _engines_vc_nan(tmp, art):
    """A copy of the art engines whose manifest's VC table has a NaN (JSON as Python writes it)."""
    shutil.copytree(art / "engines", tmp / "engines")
    path = tmp / "engines" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["vc"][1][0] = math.nan
    path.write_text(json.dumps(manifest))
    return ["generate", "--engines", str(tmp / "engines"), "--labels", "1", "--steps", str(STEPS), "--out",
            str(tmp / "out")]


def _all(value):
    return lambda tensors: {k: torch.full_like(v, value) for k, v in tensors.items()}


def _one(name, value):
    return lambda tensors: {**tensors, name: torch.full_like(tensors[name], value)}


QKV_INPUT, PROJ_WEIGHT = "blocks.0.attn.qkv.input_quantizer", "blocks.0.attn.proj.weight_quantizer"


def _flat(name):
    """A per-channel amax stored flat, (out,) instead of (out, 1): the right count, the wrong broadcast."""
    return lambda tensors: {**tensors, name: tensors[name].reshape(-1).contiguous()}


def _zero_init_recipe(tmp, art):
    """A zero-initialised DiT (adaLN weights zero, as `qandc init` makes it) and its recipe: zero weight amax there
    is legitimate."""
    model = initialize_weights(DiT(tiny_config(guidance="all")), seed=0, zero_init=True).eval()
    save_checkpoint(model, tmp / "z.pt")
    assert main(["calibrate", "--checkpoint", str(tmp / "z.pt"), *CALIBRATE, "--out", str(tmp / "zr")]) == 0
    return tmp / "z.pt", tmp / "zr"


def _zero_init_generate(tmp, art):
    checkpoint, recipe = _zero_init_recipe(tmp, art)
    return _generate(tmp, art, "--recipe", str(recipe), checkpoint=checkpoint)


def _zero_amax_on_live_weights(tmp, art):
    """The zero-init recipe with a zero amax moved onto a layer whose weights are not zero."""
    checkpoint, recipe = _zero_init_recipe(tmp, art)
    save_file(_one(PROJ_WEIGHT, 0.0)(load_file(recipe / "amax.safetensors")), str(recipe / "amax.safetensors"))
    return _generate(tmp, art, "--recipe", str(recipe), checkpoint=checkpoint)


def _out_file(tmp, art, command):
    (tmp / "taken").write_text("a file the user keeps")
    return _replace_out(command(tmp, art), tmp / "taken")


def _replace_out(argv, out):
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(out)
    return argv


def _dangling(command):
    def setup(tmp, art):
        (tmp / "link").symlink_to(tmp / "nowhere" / "target")
        return _replace_out(command(tmp, art), tmp / "link")
    return setup


def _under_a_file(command):
    def setup(tmp, art):
        (tmp / "taken").write_text("a file the user keeps")
        return _replace_out(command(tmp, art), tmp / "taken" / "sub")
    return setup


def _init(tmp, art, *extra):
    return ["init", "--config", "DiT-S/2", "--input-size", "8", "--num-classes", "10", *extra, "--out",
            str(tmp / "out.pt")]


def _train(*extra):
    """train a small DiT on the 4-image Fashion-MNIST of the art folder for 2 steps, with `extra` arguments."""
    return lambda tmp, art: ["train", "--out", str(tmp / "t"), "--data-dir", str(art / "fmnist"), "--steps", "2",
                             "--hidden", "32", "--depth", "1", "--heads", "2", *extra]


def _export(tmp, art):
    return ["export", "--checkpoint", str(art / "m.pt"), "--out", str(tmp / "out")]


def _build(tmp, art):
    return ["build-engine", "--onnx", str(art / "onnx"), "--out", str(tmp / "out")]


def _eval_out_dir(tmp, art):
    np.savez(tmp / "s.npz", images=np.zeros((3, 28, 28), np.uint8))
    return ["eval", "--samples", str(tmp / "s.npz"), "--out", str(tmp / "out.json")]


def _init_out_is_a_directory(tmp, art):
    (tmp / "out.pt").mkdir()
    return _init(tmp, art)


def _read_only_mount(tmp):
    """tmp/ro: a read-only tmpfs (root ignores file permissions, so a mount makes it unwritable)."""
    (tmp / "ro").mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(tmp / "ro")], check=True)
    else:
        (tmp / "ro").chmod(0o555)
    return tmp / "ro"


def _read_only(command):
    def setup(tmp, art):
        return _replace_out(command(tmp, art), _read_only_mount(tmp) / "out")
    return setup


def _full_disk(command, out="out"):
    """`command` writing into tmp/full, a 64 KiB tmpfs already full (root only: skipped otherwise)."""
    def setup(tmp, art):
        argv = command(tmp, art)
        if os.geteuid() != 0:
            pytest.skip("a full disk is a full tmpfs, which only root can mount")
        (tmp / "full").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp / "full")], check=True)
        with contextlib.suppress(OSError), open(tmp / "full" / "filler", "wb") as f:
            for _ in range(1024):
                f.write(bytes(4096))
                f.flush()
        return _replace_out(argv, tmp / "full" / out)
    return setup


GENERATE_TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}

CASES = [
    # numbers the user types
    Case("seed-negative", "values", "generate --seed -1", _with("--seed", "-1"), "--seed", "-1"),
    Case("seed-beyond-64-bits", "values", "generate --seed 2**64", _with("--seed", str(2 ** 64)), "--seed"),
    Case("init-seed-negative", "values", "init --seed -1", lambda tmp, art: _init(tmp, art, "--seed", "-1"),
         "--seed"),
    Case("eta-nan", "values", "generate --sampler ddim --eta nan",
         lambda tmp, art: _generate(tmp, art, "--sampler", "ddim", "--eta", "nan"), "--eta", "nan"),
    Case("eta-above-one", "values", "generate --sampler ddim --eta 2",
         lambda tmp, art: _generate(tmp, art, "--sampler", "ddim", "--eta", "2"), "--eta", "between 0 and 1"),
    Case("eta-negative", "values", "generate --sampler ddim --eta -0.5",
         lambda tmp, art: _generate(tmp, art, "--sampler", "ddim", "--eta", "-0.5"), "--eta"),
    Case("cfg-scale-nan", "values", "generate --cfg-scale nan", _with("--cfg-scale", "nan"), "--cfg-scale", "finite"),
    Case("cfg-scale-inf", "values", "generate --cfg-scale inf", _with("--cfg-scale", "inf"), "--cfg-scale", "finite"),
    Case("num-images-negative", "values", "generate --num-images -3", _with("--num-images", "-3"), "--num-images"),
    Case("num-images-beyond-the-limit", "values", "generate --num-images 10**11", _with("--num-images", str(10 ** 11)),
         "--num-images", "at most 10,000,000"),
    Case("per-class-beyond-the-limit", "values", "generate --per-class 10**11", _with("--per-class", str(10 ** 11)),
         "--per-class", "at most 10,000,000"),
    Case("num-heads-zero", "values", "generate --num-heads 0", _with("--num-heads", "0"), "--num-heads"),
    Case("calibrate-cfg-scale-nan", "values", "calibrate --cfg-scale nan", _with("--cfg-scale", "nan", _calibrate),
         "--cfg-scale", "finite"),
    Case("calibrate-seed-negative", "values", "calibrate --seed -1", _with("--seed", "-1", _calibrate), "--seed"),
    Case("calibrate-tau-inf", "values", "calibrate --tau inf", _with("--tau", "inf", _calibrate), "--tau"),
    Case("calibrate-alpha-nan", "values", "calibrate --alpha nan", _with("--alpha", "nan", _calibrate), "--alpha"),
    Case("calibrate-tap-m-negative", "values", "calibrate --tap-m -1", _with("--tap-m", "-1", _calibrate),
         "--tap-m"),
    Case("build-max-batch-zero", "values", "build-engine --max-batch 0",
         lambda tmp, art: [*_build(tmp, art), "--max-batch", "0"], "--max-batch"),
    Case("build-batch-sizes-negative", "values", "build-engine --batch-sizes 4,-2",
         lambda tmp, art: [*_build(tmp, art), "--batch-sizes", "4,-2"], "--batch-sizes"),
    Case("train-minutes-nan", "values", "train --minutes nan", _train("--minutes", "nan"), "--minutes"),
    Case("train-lr-inf", "values", "train --lr inf", _train("--lr", "inf"), "--lr"),
    Case("train-label-dropout-above-one", "values", "train --label-dropout 1.5", _train("--label-dropout", "1.5"),
         "--label-dropout"),
    Case("bench-budget-nan", "values", "bench --budget-s nan",
         lambda tmp, art: ["bench", "--state", str(tmp / "s"), "--budget-s", "nan"], "--budget-s"),
    # amax and VC values a recipe holds
    Case("amax-all-zero", "values", "every amax 0, generate --recipe", _recipe(_all(0.0)), "amax.safetensors",
         "0"),
    Case("amax-all-zero-export", "values", "every amax 0, export --recipe", _recipe(_all(0.0), command="export"),
         "amax.safetensors", "0"),
    Case("amax-input-zero", "values", "one activation amax 0", _recipe(_one(QKV_INPUT, 0.0)), QKV_INPUT),
    Case("amax-negative", "values", "one amax -1", _recipe(_one(QKV_INPUT, -1.0)), QKV_INPUT, "negative"),
    Case("amax-nan", "values", "one weight amax NaN", _recipe(_one(PROJ_WEIGHT, math.nan)), PROJ_WEIGHT, "NaN"),
    Case("amax-inf-export", "values", "one amax inf, export", _recipe(_one(QKV_INPUT, math.inf), command="export"),
         QKV_INPUT, "inf"),
    Case("amax-per-channel-flat", "values", "a per-channel amax stored (out,) not (out, 1)",
         _recipe(_flat(PROJ_WEIGHT)),
         "", expect="ok", reference=lambda tmp, art: _replace_out(_with("--recipe", str(art / "recipe"))(tmp, art),
                                                                   tmp / "ref")),
    Case("amax-zero-init-layer", "values", "zero weight amax of zero-initialised adaLN layers",
         _zero_init_generate, "", expect="ok"),
    Case("amax-zero-on-live-weights", "values", "zero weight amax for a layer whose weights are not zero",
         _zero_amax_on_live_weights, PROJ_WEIGHT, "not zero"),
    Case("vc-nan", "values", "VC table with a NaN", _recipe(lambda t: {"K": t["K"].index_fill(0, torch.tensor([1]),
                                                                                        math.nan)}, "vc.safetensors"),
         "vc.safetensors", "NaN"),
    Case("vc-negative", "values", "VC table all -1", _recipe(_all(-1.0), "vc.safetensors"), "vc.safetensors",
         "positive"),
    Case("vc-inf-export", "values", "VC table with inf, export",
         _recipe(_all(math.inf), "vc.safetensors", command="export"), "vc.safetensors"),
    Case("recipe-cfg-scale-nan", "values", "recipe.json with cfg_scale NaN", _recipe_json(cfg_scale=math.nan),
         "recipe.json", "cfg_scale"),
    Case("engines-vc-nan", "values", "engine manifest with a NaN VC factor", _engines_vc_nan, "manifest.json", "NaN"),
    # torchrun's environment
    Case("world-size-without-rank", "environment", "WORLD_SIZE=2 without torchrun", _generate, "RANK",
         env={"WORLD_SIZE": "2"}),
    Case("world-size-not-a-number", "environment", "WORLD_SIZE=two", _generate, "WORLD_SIZE",
         env={"WORLD_SIZE": "two", **GENERATE_TORCHRUN}),
    Case("world-size-zero", "environment", "WORLD_SIZE=0", _generate, "WORLD_SIZE",
         env={"WORLD_SIZE": "0", **GENERATE_TORCHRUN}),
    Case("rank-beyond-world", "environment", "RANK=2 of WORLD_SIZE=2", _generate, "RANK",
         env={"WORLD_SIZE": "2", **GENERATE_TORCHRUN, "RANK": "2"}),
    Case("local-rank-negative", "environment", "LOCAL_RANK=-1", _generate, "LOCAL_RANK",
         env={"WORLD_SIZE": "2", **GENERATE_TORCHRUN, "LOCAL_RANK": "-1"}),
    Case("no-master-addr", "environment", "torchrun variables without MASTER_ADDR", _generate, "MASTER_ADDR",
         env={"WORLD_SIZE": "2", **GENERATE_TORCHRUN, "MASTER_ADDR": None}),
    Case("calibrate-world-size-without-rank", "environment", "calibrate under WORLD_SIZE=2", _calibrate, "RANK",
         env={"WORLD_SIZE": "2"}),
    Case("run-world-size-not-a-number", "environment", "run under WORLD_SIZE=x",
         lambda tmp, art: ["run", "--out", str(tmp / "out")], "WORLD_SIZE", env={"WORLD_SIZE": "x"}),
    # --out paths
    Case("calibrate-out-is-a-file", "environment", "calibrate --out FILE", lambda t, a: _out_file(t, a, _calibrate),
         "taken", "not a directory"),
    Case("export-out-is-a-file", "environment", "export --out FILE", lambda t, a: _out_file(t, a, _export), "taken",
         "not a directory"),
    Case("build-out-is-a-file", "environment", "build-engine --out FILE", lambda t, a: _out_file(t, a, _build),
         "taken", "not a directory"),
    Case("train-out-is-a-file", "environment", "train --out FILE", lambda t, a: _out_file(t, a, _train()), "taken",
         "not a directory"),
    Case("run-preset-fake-quant-only", "values", "run --preset w4a8",
         lambda t, a: ["run", "--checkpoint", str(a / "m.pt"), "--preset", "w4a8", "--out", str(t / "run")],
         "--preset", "invalid choice: 'w4a8'"),
    Case("generate-out-empty", "environment", "generate --out ''", lambda t, a: _generate(t, a)[:-1] + [""],
         "--out", "empty path"),
    Case("eval-out-empty", "environment", "eval --out ''", lambda t, a: [*_eval_out_dir(t, a)[:-1], ""], "--out",
         "empty path"),
    Case("generate-out-dangling-link", "environment", "generate --out LINK-TO-NOWHERE", _dangling(_generate), "link",
         "link"),
    Case("init-out-dangling-link", "environment", "init --out LINK-TO-NOWHERE", _dangling(_init), "link", "link"),
    Case("calibrate-out-under-a-file", "environment", "calibrate --out FILE/sub", _under_a_file(_calibrate),
         "taken", "not a directory"),
    Case("eval-out-under-a-file", "environment", "eval --out FILE/sub", _under_a_file(_eval_out_dir), "taken",
         "not a directory"),
    Case("init-out-is-a-directory", "environment", "init --out DIR", _init_out_is_a_directory, "out.pt",
         "is a directory"),
    Case("generate-out-read-only", "environment", "generate --out on a read-only file system",
         _read_only(_generate), "ro", "not writable"),
    Case("export-out-read-only", "environment", "export --out on a read-only file system", _read_only(_export), "ro",
         "not writable"),
    # a full disk
    Case("generate-disk-full", "environment", "generate onto a full disk", _full_disk(_generate), "full/out",
         "No space left"),
    Case("calibrate-disk-full", "environment", "calibrate onto a full disk", _full_disk(_calibrate), "full/out",
         "No space left"),
    Case("init-disk-full", "environment", "init onto a full disk", _full_disk(_init, "out.pt"), "full/out.pt",
         "No space left"),
    Case("export-disk-full", "environment", "export onto a full disk", _full_disk(_export), "full/out",
         "No space left"),
    Case("build-disk-full", "environment", "build-engine onto a full disk", _full_disk(_build), "full/out",
         "No space left"),
    Case("eval-disk-full", "environment", "eval --out onto a full disk", _full_disk(_eval_out_dir, "e.json"),
         "full/", "No space left"),
]


def _tree(folder: Path) -> dict:
    """sha256 of every file under `folder` (links as their target), directories as None."""
    out = {}
    for path in sorted(folder.rglob("*")):
        with contextlib.suppress(OSError):
            out[str(path)] = sha256_file(path) if path.is_file() else None
    return out


def _run(argv: list[str], capsys) -> tuple[object, str]:
    """(exit code or the exception that escaped, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 - a traceback is an outcome to count
        code = e
    return code, capsys.readouterr().err


def outcome(code, err: str, case: Case, changed: bool) -> str:
    """clear, ok, traceback, unclear, silent bad data or data lost."""
    if changed:
        return "data lost"
    if isinstance(code, BaseException):
        return "traceback"
    if case.expect == "ok":
        return "ok" if code == 0 else "refused good input"
    if code == 0:
        return "silent bad data"
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if ERROR.match(line)]
    clear = (code == 2 and len(errors) == 1 and errors[0] == lines[-1] and case.names in errors[0]
             and re.search(case.problem, errors[0]))
    return "clear" if clear else "unclear"


def run_case(case: Case, tmp: Path, art: Path, capsys, monkeypatch) -> tuple[str, str]:
    """Run `case` in-process in `tmp`: (its outcome, stderr)."""
    monkeypatch.chdir(tmp)
    argv = case.setup(tmp, art)
    for key, value in (case.env or {}).items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    inputs, before = _tree(art), _tree(tmp)
    try:
        code, err = _run(argv, capsys)
        if case.reference is not None and code == 0:
            assert main(case.reference(tmp, art)) == 0
            capsys.readouterr()
            code = 0 if np.array_equal(*(np.load(tmp / d / "samples.npz")["samples"] for d in ("out", "ref"))) \
                else "other samples"
        after = _tree(tmp)
    finally:
        monkeypatch.undo()
        for mount in ("ro", "full"):
            if (tmp / mount).is_mount():
                subprocess.run(["umount", "--lazy", str(tmp / mount)], check=True)  # a leaked handle keeps it busy
    changed = _tree(art) != inputs or any(after.get(k, "gone") != v for k, v in before.items())
    wrote = case.expect == "error" and {k for k, v in after.items() if v} != {k for k, v in before.items() if v}
    result = "silent bad data" if code == "other samples" else outcome(code, err, case, changed)
    if result == "clear" and wrote:
        result = "wrote files"
    return result, err if not isinstance(code, BaseException) else f"{type(code).__name__}: {code}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_value(case, art, tmp_path, capsys, monkeypatch):
    result, err = run_case(case, tmp_path, art, capsys, monkeypatch)
    assert result == ("ok" if case.expect == "ok" else "clear"), (result, err)


LIBRARY_CASES = [  # (name, a library call with a hostile value, what the QandcError must name)
    ("options-seed-negative", lambda: _options(seed=-1), "seed"),
    ("options-eta-nan", lambda: _options(sampler="ddim", eta=math.nan), "eta"),
    ("options-cfg-scale-inf", lambda: _options(cfg_scale=math.inf), "cfg_scale"),
    ("options-sampler-unknown", lambda: _options(sampler="euler"), "sampler"),
    ("options-seed-a-float", lambda: _options(seed=0.5), "seed"),
    ("settings-cfg-scale-nan", lambda: _settings(cfg_scale=math.nan), "--cfg-scale"),
    ("settings-seed-negative", lambda: _settings(seed=-3), "--seed"),
]


def _options(**values):
    from qandc.runtime import SamplingOptions
    return SamplingOptions(**values)


def _settings(**values):
    from qandc.calibration import CalibrationSettings
    from qandc.calibration.calibrate import check_settings
    check_settings(tiny_model(), CalibrationSettings(**{"budget": 8, "pool_samples": 2, "steps": 4, **values}))


@pytest.mark.parametrize("name", [c[0] for c in LIBRARY_CASES])
def test_hostile_library_value(name):
    """Library users pass values to the dataclasses directly: refused there too, naming the field."""
    _, call, field = next(c for c in LIBRARY_CASES if c[0] == name)
    with pytest.raises(QandcError, match=re.escape(field)):
        call()


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so that Python installs its handler even where pytest runs as a
    background job (which starts with SIGINT ignored, and Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _generate_process(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qandc", "generate", "--checkpoint", str(root / "m.pt"), "--num-images", "8",
            "--batch-size", "2", "--steps", "100", "--out", str(out)]


@pytest.mark.interruption
def test_interrupt_keeps_whole_shards_and_resumes(art, tmp_path):
    """Ctrl-C (SIGINT) in the middle of sampling: exit 130 and one line, every file left is whole (no temporary
    file), and a rerun finishes with the uninterrupted run's samples."""
    subprocess.run(_generate_process(art, tmp_path / "whole"), check=True, capture_output=True)
    out = tmp_path / "cut"
    process = subprocess.Popen(_generate_process(art, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not (out / "shards" / "shard-00001.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and lines[-1].startswith("qandc: interrupted"), stderr
    assert not (out / "samples.npz").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    kept = sorted(p.name for p in (out / "shards").iterdir())
    assert 2 <= len(kept) < 4, kept
    rerun = subprocess.run(_generate_process(art, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(kept)} kept" in rerun.stderr
    whole, resumed = (np.load(folder / "samples.npz") for folder in (tmp_path / "whole", out))
    assert np.array_equal(whole["samples"], resumed["samples"]) and np.array_equal(whole["labels"], resumed["labels"])
