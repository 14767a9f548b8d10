import argparse
import json
import re
import subprocess
import sys
import traceback
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qandc.artifacts import sha256_file
from qandc.cli import main
from qandc.sampling import CachePlan


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "rgb.pt"
    assert main(["init", "--config", "DiT-S/8", "--input-size", "16", "--in-channels", "3", "--num-classes", "5",
                 "--nonzero", "--out", str(path)]) == 0
    return path


def test_generate_writes_samples_grid_and_config(checkpoint, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(checkpoint), "--labels", "0,1,4", "--steps", "6",
                 "--cache", "interval=2,branches=mlp", "--seed", "3", "--batch-size", "2", "--out", str(out)]) == 0
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (3, 3, 16, 16) and data["samples"].dtype == np.float32
    assert data["labels"].tolist() == [0, 1, 4]
    config = json.loads((out / "config.json").read_text())
    grid = Image.open(out / "grid.png")  # 3 samples of 16x16 px in a 2x2 grid, each shown at 64 px under a caption
    assert grid.width == 2 * 64 and grid.height > 2 * 64 and grid.text["Description"] == config["caption"]
    assert config["caption"] == (f"{CachePlan.parse('interval=2,branches=mlp').describe()} · float · ddpm 6 steps · "
                                 "CFG 1.5 · seed 3")
    assert config["checkpoint_sha256"] == sha256_file(checkpoint)
    assert config["plan"]["branches"] == "mlp" and config["seed"] == 3 and config["guidance"] == "first3"
    assert "torch" in config["versions"]
    # batching does not change a sample: noise is keyed by (seed, index)
    assert main(["generate", "--checkpoint", str(checkpoint), "--labels", "0,1,4", "--steps", "6",
                 "--cache", "interval=2,branches=mlp", "--seed", "3", "--out", str(tmp_path / "one")]) == 0
    again = np.load(tmp_path / "one" / "samples.npz")["samples"]
    assert np.allclose(again, data["samples"], rtol=1e-4, atol=1e-4 * np.abs(again).max())


def test_latent_models_save_latents_without_a_grid(tmp_path, capsys):
    ckpt = tmp_path / "latent.pt"
    main(["init", "--config", "DiT-S/8", "--input-size", "16", "--num-classes", "3", "--out", str(ckpt)])
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "1", "--steps", "2", "--out",
                 str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "samples.npz").exists() and not (tmp_path / "g" / "grid.png").exists()
    assert "--vae" in capsys.readouterr().err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qandc", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt"], "no such file"),
    (["--labels", "5"], "label 5 is out of range"),
    (["--cache", "interval=0"], "interval"),
    (["--cache", "interval=2,branches=blocks.99.mlp"], "blocks.99.mlp"),
    (["--steps", "0"], "--steps: must be an integer from 1 to 1000"),
    (["--sampler", "euler"], "invalid choice"),
])
def test_bad_input_gives_one_line_and_exit_2(checkpoint, tmp_path, args, message):
    base = {"--checkpoint": str(checkpoint), "--out": str(tmp_path / "o")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = _run("generate", *[v for kv in base.items() for v in kv])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_debug_shows_the_traceback(tmp_path):
    result = _run("--debug", "generate", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_explains_every_command():
    for command in ([], ["generate"], ["init"]):
        result = _run(*command, "--help")
        assert result.returncode == 0 and "usage: qandc" in result.stdout
    assert "--cache" in _run("generate", "--help").stdout


def test_latents_decode_through_a_local_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "latent.pt"
    main(["init", "--config", "DiT-S/8", "--input-size", "16", "--num-classes", "3", "--nonzero", "--out", str(ckpt)])
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "0,2", "--steps", "2", "--vae",
                 str(tmp_path / "vae"), "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "grid.png").width == 2 * 64  # two decoded 16x16 samples at 64 px each
    assert main(["generate", "--checkpoint", str(ckpt), "--labels", "0", "--steps", "2", "--vae",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "h")]) == 2


def test_non_finite_samples_are_an_error_not_a_black_image(tmp_path, capsys):
    """A model that overflows (here: one infinite weight) must not leave NaN images behind silently."""
    from conftest import tiny_model
    from qandc.model import save_checkpoint

    model = tiny_model(in_channels=1, learn_sigma=False)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = float("inf")
    save_checkpoint(model, tmp_path / "inf.pt", {})
    assert main(["generate", "--checkpoint", str(tmp_path / "inf.pt"), "--labels", "1,2", "--steps", "4",
                 "--out", str(tmp_path / "out")]) == 2
    assert "are not finite (NaN / Inf)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "samples.npz").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from conftest import tiny_model
    from qandc.model import save_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "m.pt"
    save_checkpoint(tiny_model(), path)
    return path


TINY_CALIBRATE = ["--preset", "w8a8-int8", "--selector", "random", "--samples", "8", "--pool-samples", "2",
                  "--steps", "4", "--clusters", "2", "--vc-samples", "2", "--batch-size", "4", "--cache", "interval=2"]


@pytest.mark.parametrize("module,hint", [
    ("modelopt.torch.quantization", "qandc run needs nvidia-modelopt: pip install 'qandc[calibrate]'"),
    ("onnx", "qandc run needs onnx: pip install 'qandc[export]'"),
    ("onnxruntime", "qandc run needs onnxruntime: pip install 'qandc[ort]' (or 'qandc[ort-gpu]'"),
])
def test_a_missing_dependency_is_one_hint_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, capsys, module,
                                                          hint):
    monkeypatch.setitem(sys.modules, module, None)  # its import now fails
    out = tmp_path / "run"
    args = ["run", "--checkpoint", str(tiny_checkpoint), *TINY_CALIBRATE, "--labels", "1", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qandc: error: {hint}") and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing computed, nothing written

    from qandc.errors import QandcError

    with pytest.raises(QandcError) as raised:  # --debug (after the subcommand): the import error behind the hint
        main([*args, "--debug"])
    shown = "".join(traceback.format_exception(raised.value))
    assert "ModuleNotFoundError" in shown and module in shown and hint in shown
    assert not out.exists()


def test_calibrate_checks_modelopt_first(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelopt.torch.export", None)
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), *TINY_CALIBRATE, "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == \
        "qandc: error: qandc calibrate needs nvidia-modelopt: pip install 'qandc[calibrate]'"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags", [["--debug"], ["--verbose", "--debug"]])
def test_output_flags_are_accepted_after_the_subcommand(tmp_path, flags):
    from qandc.errors import QandcError

    missing = ["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]
    assert main(["generate", *missing]) == 2
    with pytest.raises(QandcError, match="no such file"):
        main(["generate", *missing, *flags])
    with pytest.raises(QandcError, match="no such file"):
        main([*flags, "generate", *missing])


def _option_helps(help_text: str) -> dict[str, str]:
    """Each option's help in a --help text, by its option string (wrapped lines joined)."""
    sections, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            sections[current] = ""
        if current and (match or line.startswith("      ")):
            sections[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in sections.items()}


def test_every_help_shows_the_defaults():
    from qandc.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subparsers.items():
        helps = _option_helps(sub.format_help())
        for action in sub._actions:
            stated = action.default is not None and action.default is not False and action.default != []
            if action.option_strings and stated and action.default is not argparse.SUPPRESS:  # 0 is stated too
                assert "default" in helps[action.option_strings[0]], (name, action.option_strings)
    calibrate = _option_helps(subparsers["calibrate"].format_help())
    for option, default in (("--preset", "w8a8-fp8"), ("--selector", "tap"), ("--steps", "50"), ("--sampler", "ddpm"),
                            ("--cfg-scale", "1.5")):
        assert calibrate[option].endswith(f"(default {default})"), calibrate[option]


def test_help_lines_break_between_words_only():
    """A cache spec's grammar and the bench's stage names come out whole, never cut at a hyphen or mid-word."""
    from qandc.bench import STAGE_CHOICES
    from qandc.cli import build_parser
    from qandc.sampling.plan import AUTO_GRAMMAR

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    words = subparsers["calibrate"].format_help().split()
    assert all(word in words for word in AUTO_GRAMMAR.split())
    words = [word.strip(",;:()") for word in subparsers["bench"].format_help().split()]
    assert all(stage in words for stage in STAGE_CHOICES)


def test_chatter_is_silenced_unless_verbose_and_onnx_takes_a_file(tiny_checkpoint, tmp_path, capsys):
    """ModelOpt's "Inserted N quantizers" and the tracer's warnings show with --verbose only; build-engine --onnx
    takes a file of the export folder."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.torch.quantization")
    ckpt = ["--checkpoint", str(tiny_checkpoint)]
    assert main(["calibrate", *ckpt, *TINY_CALIBRATE, "--out", str(tmp_path / "r")]) == 0
    assert "quantizers" not in capsys.readouterr().out
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["export", *ckpt, "--recipe", str(tmp_path / "r"), "--out", str(tmp_path / f"o{verbose}"),
                         *(["--verbose"] if verbose else [])]) == 0
        tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        assert bool(tracer) == verbose
        assert ("Inserted" in capsys.readouterr().out) == verbose
    assert main(["build-engine", "--onnx", str(tmp_path / "oFalse" / "full.onnx"), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "manifest.json").is_file()


def test_inspect_walks_a_run_folder_stage_by_stage(tiny_checkpoint, tmp_path, capsys):
    """A qandc run folder (assembled from the stage commands) is shown stage by stage, missing stages named."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.torch.quantization")
    run, ckpt = tmp_path / "run", ["--checkpoint", str(tiny_checkpoint)]
    assert main(["calibrate", *ckpt, *TINY_CALIBRATE, "--out", str(run / "recipe")]) == 0
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "recipe.json: " in out and "missing stages: onnx/, engines/, samples/, eval.json" in out
    assert main(["export", *ckpt, "--recipe", str(run / "recipe"), "--out", str(run / "onnx")]) == 0
    assert main(["build-engine", "--onnx", str(run / "onnx"), "--out", str(run / "engines")]) == 0
    assert main(["generate", "--engines", str(run / "engines"), "--labels", "1", "--out", str(run / "samples")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    stages = [out.index(f"[{i}/5] {s}") for i, s in enumerate(("recipe/", "onnx/", "engines/", "samples/",
                                                                "eval.json"), 1)]
    assert stages == sorted(stages)
    assert '"kind": "onnx-export"' in out and '"kind": "engines"' in out
    assert "full.ort.onnx: OK" in out and "config.json: " in out
    assert "missing stages: eval.json" in out
    (run / "eval.json").write_text(json.dumps({"command": "run", "n": 4, "fd": None, "fd_reliable": False,
                                               "fd_note": "no FD below n=129", "class_accuracy": 0.75}))
    (run / "engines" / "reuse.ort.onnx").write_bytes(b"tampered")
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "class accuracy 0.7500  (n=4); no FD below n=129" in out and "every stage is there" in out
    assert "reuse.ort.onnx: CHECKSUM MISMATCH" in out
    samples = ["generate", "--labels", "1", "--steps", "2", "--out", str(run / "samples")]  # the reference model
    assert main(samples) == 0 and main(["eval", "--samples", str(run / "samples")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run / "samples")]) == 0
    out = capsys.readouterr().out
    assert '"class_accuracy": ' in out and "of other samples" not in out
    assert json.loads((run / "samples" / "eval.json").read_text())["samples"] == "qandc generate directory ."
    assert main([*samples, "--seed", "5"]) == 0  # other samples into that folder: its eval.json is of the old ones
    assert f"note: {run / 'samples' / 'eval.json'} is of other samples" in capsys.readouterr().err
    assert main(["inspect", str(run / "samples")]) == 0
    assert f"of other samples: {run / 'samples' / 'samples.npz'} has changed since" in capsys.readouterr().out


def test_no_escape_codes_when_stderr_is_not_a_terminal(checkpoint, tmp_path):
    """Off a terminal no bar is drawn: no carriage returns or escape codes in a log (bytes: no newline translation)."""
    result = subprocess.run([sys.executable, "-m", "qandc", "generate", "--checkpoint", str(checkpoint), "--labels",
                             "0,1", "--steps", "6", "--out", str(tmp_path / "g")], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert b"\r" not in result.stderr and b"\x1b[" not in result.stderr and b"%|" not in result.stderr
