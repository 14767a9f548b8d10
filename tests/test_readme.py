"""The README runs: its ```python blocks and the `qandc` lines of its ```sh blocks, in the order they appear, in one
folder (so the recipe, export, engines and samples one line makes feed the next), at tiny size. A line needing a GPU,
several processes or minutes is skipped with its reason (SKIPPED); sizes are made tiny by the substitutions in TINY,
each with its reason. Both tables must match something in the README, so neither goes stale."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import save_tiny_dit_pipeline

from qandc.cli import main

README = Path(__file__).parents[1] / "README.md"

# Commands not run: regex on the command (its comment stripped) -> why.
SKIPPED = {
    r"^make\b": "CI's own entry points: set-up, the 4.5-minute main job and this suite",
    r"^torchrun\b": "several processes: tests/test_distributed.py runs generate and calibrate under torchrun",
    r"^python benchmarks/": "benchmarks are GPU jobs at thousands of samples",
    r"^qandc train\b|^python -m qandc\.metrics\.classifier\b": "training needs the Fashion-MNIST files and minutes",
    r"--backend inductor\b|^qandc bench\b": "needs a GPU",
    r"^pip install\b": "installation: CI installs the test extras, .ci/calibrate-extra a clean [calibrate]",
    r"^qandc serve\b|^curl\b": "a server that runs until stopped and a client of it: tests/test_serve.py starts the "
                                 "real server on a free port and talks to it over HTTP",
}

CALIBRATION_SIZE = "--samples 16 --pool-samples 4 --vc-samples 2 --clusters 4 --steps 4"
# Sizes made tiny: regex -> (replacement, why). An appended option wins: argparse keeps an option's last value.
TINY = {
    r"^(qandc (calibrate|run)\b.*)$": (rf"\1 {CALIBRATION_SIZE}",
                                       "16 samples of 4 x 4 steps (4 TAP clusters), not 800 of 400 x 50"),
    r"^(qandc generate\b(?!.*--(recipe|engines|steps)\b).*)$": (r"\1 --steps 4",
                                                                "4 steps instead of 50 (artifacts carry their 4)"),
    r"--steps 50\b": ("--steps 4", "4 sampling steps instead of 50"),
    r"--per-class 8\b": ("--per-class 2", "2 samples a class instead of 8"),
    r"--num-images 200\b": ("--num-images 8", "8 samples instead of 200 (FD is not reported below 129 anyway)"),
    r"--num-images 50000 --batch-size 256\b": ("--num-images 8 --batch-size 4", "8 samples in two shards"),
    r"--config DiT-XL/2\b": ("--config DiT-S/8 --input-size 8", "DiT-XL/2 writes 2.7 GB; DiT-S/8 at 8x8 is 130 MB"),
    r"\bsteps=20\b": ("steps=4", "4 sampling steps instead of 20"),
    r"\bnum_inference_steps=50\b": ("num_inference_steps=4", "4 sampling steps instead of 50"),
}


def snippets() -> list[tuple[int, str, str]]:
    """(line, "sh" or "python", text): every command of the README's sh blocks and every python block, in order."""
    found, fence, block, start = [], None, [], 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence is None and line in ("```sh", "```python"):
            fence, block, start = line[3:], [], number + 1
        elif fence and line.startswith("```"):
            found += [(start, fence, "\n".join(block) + "\n")] if fence == "python" else sh_commands(start, block)
            fence = None
        elif fence:
            block.append(line)
    return found


def sh_commands(start: int, lines: list[str]) -> list[tuple[int, str, str]]:
    """(line, "sh", command) per command of an sh block: continuation lines joined, comments stripped."""
    commands, pending, first = [], "", start
    for number, line in enumerate(lines, start):
        first = first if pending else number
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
        elif words := shlex.split(pending, comments=True):
            commands.append((first, "sh", " ".join(words)))
            pending = ""
    return commands


SNIPPETS = snippets()


def tiny(text: str) -> str:
    for pattern, (replacement, _why) in TINY.items():
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    return text


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, command)), None)


def test_every_rule_matches_the_readme():
    texts = [text for _, _, text in SNIPPETS]
    stale = [p for p in [*SKIPPED, *TINY] if not any(re.search(p, t, flags=re.MULTILINE) for t in texts)]
    assert not stale, f"rules matching nothing in the README: {stale}"
    unrun = [t for _, lang, t in SNIPPETS if lang == "sh" and not (skip_reason(t) or t.startswith("qandc "))]
    assert not unrun, f"sh lines neither run (qandc ...) nor skipped: {unrun}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The folder the snippets run in, holding `dit-pipeline/`: a tiny DiTPipeline (1000 classes, as the README's
    labels 207 and 360 need) that diffusers saves itself, standing for the user's own that the README loads."""
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("readme")
    save_tiny_dit_pipeline(path / "dit-pipeline", num_classes=1000)
    return path


@pytest.mark.parametrize("line,lang,text", SNIPPETS, ids=[f"README.md:{s[0]}" for s in SNIPPETS])
def test_snippet_runs(folder, monkeypatch, line, lang, text):
    monkeypatch.chdir(folder)
    if lang == "python":
        exec(compile(tiny(text), f"README.md:{line}", "exec"), {"__name__": "readme"})
        return
    if reason := skip_reason(text):
        pytest.skip(f"{text[:60]}: {reason}")
    argv = shlex.split(tiny(text))[1:]
    assert main([*argv, "--debug"]) == 0
    if "--out" in argv:
        assert Path(argv[argv.index("--out") + 1]).exists()
