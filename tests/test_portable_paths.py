"""Records name paths relative to the project or the artifact, never the absolute paths of the machine."""

import re

from qandc.artifacts import PROJECT, portable_command, portable_path

MACHINE_PATH = re.compile(r"(?<![\w.$<>])/(work|tmp|root|home)/")


def test_portable_path_is_relative_to_the_project_or_the_artifact(tmp_path):
    assert portable_path(PROJECT / "qandc" / "assets" / "reference-dit.pt") == "qandc/assets/reference-dit.pt"
    assert portable_path(tmp_path / "out" / "model.pt", tmp_path / "out") == "$OUT/model.pt"
    assert portable_path(tmp_path / "run", tmp_path / "out") == "<elsewhere>/run"
    assert portable_path("out/scale/recipe") == "out/scale/recipe"


def test_portable_command_rewrites_every_absolute_argument(tmp_path):
    command = portable_command(["qandc", "train", "--out", str(tmp_path / "run"), f"--export={tmp_path}/ref.pt",
                                "--minutes", "7.5", f"--data={PROJECT}/data"], tmp_path)
    assert command == "qandc train --out $OUT/run --export=$OUT/ref.pt --minutes 7.5 --data=data"


def test_committed_results_and_sidecars_hold_no_machine_paths():
    """benchmarks/results (its JSON and Markdown; gpu-logs and training logs are kept verbatim) and qandc/assets."""
    files = [*PROJECT.glob("benchmarks/results/*.json"), *PROJECT.glob("benchmarks/results/*.md"),
             *PROJECT.glob("qandc/assets/*.json")]
    assert len(files) > 5
    offending = [f"{f.relative_to(PROJECT)}: {m[0]}" for f in files for m in [MACHINE_PATH.search(f.read_text())] if m]
    assert not offending, offending
