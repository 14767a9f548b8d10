"""The resumable GPU benchmarks start a new state from their committed JSON (the GPU machine keeps nothing between
sessions): seeded from it, with nothing left to run, each writes that JSON again, field for field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("script, committed, args", [
    ("front.py", "front-h200.json", ["--phases", "summary"]),
    ("front_peers.py", "front-peers-h200.json", ["--budget-s", "0"]),
    ("ablation.py", "ablation.json", ["--only", "nothing"]),
])
def test_a_state_seeded_from_the_committed_json_writes_it_again(script, committed, args, tmp_path):
    out = tmp_path / committed
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    subprocess.run([sys.executable, script, "--state", str(tmp_path / "state"), "--seed-from", str(RESULTS / committed),
                    "--out", str(out), *args], cwd=ROOT / "benchmarks", env=env, check=True, capture_output=True)
    assert json.loads(out.read_text()) == json.loads((RESULTS / committed).read_text())


def test_a_seed_from_other_settings_is_refused(tmp_path):
    run = subprocess.run([sys.executable, "ablation.py", "--state", str(tmp_path / "state"), "--pool-samples", "10",
                          "--seed-from", str(RESULTS / "ablation.json"), "--only", "nothing",
                          "--out", str(tmp_path / "ablation.json")],
                         cwd=ROOT / "benchmarks", env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "rows of other settings" in run.stderr
    assert not (tmp_path / "state").exists()
