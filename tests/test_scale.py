"""Scale-out of the engine path on the CPU: each rank's ONNX Runtime device, fixed-size batches (the last one padded),
the streamed merge's memory, two torchrun "hosts" over gloo, and the engine scaling benchmark's smoke run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from qandc.distributed import merge_shards, stamped_shards, write_merged
from qandc.runtime import Pipeline, SamplingOptions, generate
from qandc.sampling.plan import default_plan_shape

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
STEPS = 50  # the engines' sampler default (SamplerDefaults): the default plan shape is made for it


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Tiny float ONNX Runtime engines under the default plan's shape (full and reuse graphs, forecast 1)."""
    pytest.importorskip("onnxruntime")
    from qandc.engines import build_engines
    from qandc.exporter import export

    root = tmp_path_factory.mktemp("engines")
    export(tiny_model(guidance="all"), root / "onnx", default_plan_shape(STEPS))
    build_engines(root / "onnx", root / "engines", "onnxruntime")
    return root / "engines"


def test_each_rank_gives_onnx_runtime_its_own_gpu(engines, monkeypatch):
    import onnxruntime

    from qandc.engines.onnxruntime_backend import session_providers

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_providers(both, 3) == [("CUDAExecutionProvider", {"device_id": "3"}), ("CPUExecutionProvider", {})]
    assert session_providers(["CPUExecutionProvider"], 3) == [("CPUExecutionProvider", {})]
    # rank 1 of a torchrun job, with an ONNX Runtime that reports the CUDA provider (as onnxruntime-gpu does): the
    # backend's sessions are created asking for GPU 1, and (this build having no CUDA) run on the CPU provider
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*both, "AzureExecutionProvider"])
    pipeline = Pipeline.load(engines)
    for engine in pipeline.denoiser.engines.values():
        assert engine.providers[0] == ("CUDAExecutionProvider", {"device_id": "1"})
        assert engine.session.get_providers() == ["CPUExecutionProvider"]
    assert pipeline.generate([1, 2], seed=0, steps=STEPS).isfinite().all()


def test_fixed_batch_runs_every_batch_at_one_size_and_gives_the_same_samples(engines, tmp_path):
    pipeline = Pipeline.load(engines)
    full = pipeline.denoiser.engines["full"]
    rows_seen = []
    infer = full.infer
    full.infer = lambda feeds: rows_seen.append(len(feeds["x"])) or infer(feeds)  # a spy: counts, then runs
    labels = [3, 1, 4, 1, 5]
    fixed = generate(pipeline, labels, tmp_path / "fixed", SamplingOptions(steps=STEPS, batch_size=2,
                                                                            fixed_batch=True))
    assert set(rows_seen) == {4} and len(rows_seen) == 3 * pipeline.last_run["full"]  # 3 batches, none twice
    assert fixed["shards"]["fixed_batch"] == 2 and fixed["warmup_seconds"] > 0
    assert fixed["sampled_images"] == 3  # the first shard (2 labels) is the warm-up, before the timing
    plain = generate(pipeline, labels, tmp_path / "plain", SamplingOptions(steps=STEPS, batch_size=2))
    assert plain["shards"]["fixed_batch"] is None and plain["warmup_seconds"] == 0 and plain["sampled_images"] == 5
    a, b = (np.load(tmp_path / name / "samples.npz") for name in ("fixed", "plain"))
    assert a["labels"].tolist() == labels and a["samples"].shape == (5, 4, 8, 8)
    assert np.allclose(a["samples"], b["samples"], atol=1e-5)  # the padding rows do not touch the real ones


def test_merge_streams_shards_one_at_a_time(tmp_path):
    count, rows, shape = 32, 64, (4, 16, 16)  # 256 KiB of samples a shard, 8 MiB in all
    shards = stamped_shards(tmp_path / "shards", [{"unit": i} for i in range(count)], {"job": 1})
    rng = np.random.default_rng(0)
    for i, (path, stamp) in enumerate(shards):
        path.parent.mkdir(exist_ok=True)
        np.savez(path, stamp=np.array(stamp), samples=rng.standard_normal((rows, *shape), dtype=np.float32),
                 labels=np.full(rows, i))
    whole_bytes = count * rows * int(np.prod(shape)) * 4

    def peak(merge) -> tuple:
        tracemalloc.start()
        try:
            result = merge()
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    head, streamed = peak(lambda: write_merged(shards, ("samples", "labels"), count * rows, tmp_path / "merged.npz",
                                               head=16))
    whole, in_memory = peak(lambda: merge_shards(shards, ("samples", "labels")))
    # reading a shard takes a few copies of it (zipfile's buffers); the merge holds no more than that
    assert streamed < whole_bytes / 4 < in_memory, (streamed, in_memory)
    merged = np.load(tmp_path / "merged.npz")
    assert sorted(merged.files) == ["labels", "samples"]
    for name in ("samples", "labels"):
        assert np.array_equal(merged[name], whole[name]) and np.array_equal(head[name], whole[name][:16])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOSTS_ARGS = ["generate", "--num-images", "7", "--batch-size", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def one_process(engines, tmp_path_factory):
    """The samples of one process (no torchrun)."""
    out = tmp_path_factory.mktemp("one") / "out"
    result = subprocess.run([sys.executable, "-m", "qandc", *HOSTS_ARGS, "--engines", str(engines), "--out", str(out)],
                            env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out / "samples.npz")


def two_hosts(engines, outs: list[Path]) -> list[tuple[int, str]]:
    """Two torchrun launchers (--nnodes 2, one process each, c10d rendezvous on localhost) playing two hosts, each
    with its own --out; (exit status, stderr) of each. The rendezvous, not --node-rank, decides which is rank 0."""
    endpoint = f"127.0.0.1:{_free_port()}"
    hosts = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "qandc-test", "-m", "qandc", *HOSTS_ARGS, "--engines", str(engines),
                               "--out", str(out)],
                              env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, out in enumerate(outs)]
    stderr = [host.communicate(timeout=240)[1] for host in hosts]
    return [(host.returncode, err) for host, err in zip(hosts, stderr)]


@pytest.mark.slow
def test_two_hosts_sharing_the_output_folder_give_one_process_samples(engines, one_process, tmp_path):
    logs = two_hosts(engines, [tmp_path / "out"] * 2)
    assert [status for status, _ in logs] == [0, 0], [err[-2000:] for _, err in logs]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["world_size"] == 2 and config["shards"]["count"] == 4
    stderr = "".join(err for _, err in logs)
    assert "rank 0/2 shards: 2 computed" in stderr and "rank 1/2 shards: 2 computed" in stderr
    two = np.load(tmp_path / "out" / "samples.npz")
    assert np.array_equal(one_process["samples"], two["samples"]) and np.array_equal(one_process["labels"],
                                                                                      two["labels"])


@pytest.mark.slow
def test_two_hosts_without_a_shared_folder_merge_once_the_shards_are_copied(engines, one_process, tmp_path):
    outs = [tmp_path / "host-a", tmp_path / "host-b"]
    logs = two_hosts(engines, outs)
    # rank 0's host misses the other host's shards: every rank stops with that line (no launcher waits for the other)
    assert all(status for status, _ in logs), [err[-2000:] for _, err in logs]
    line = next(line for line in logs[0][1].splitlines() if "missing" in line)
    assert "without a folder shared by every host, copy each host's OUT/shards" in line
    merging = next(out for out in outs if str(out) in line)
    other = outs[1 - outs.index(merging)]
    for shard in (other / "shards").glob("shard-*.npz"):
        shutil.copy(shard, merging / "shards")
    rerun = subprocess.run([sys.executable, "-m", "qandc", *HOSTS_ARGS, "--engines", str(engines), "--out",
                            str(merging)], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0 and "shards: 0 computed, 4 kept" in rerun.stderr, rerun.stderr[-2000:]
    assert np.array_equal(np.load(merging / "samples.npz")["samples"], one_process["samples"])


def test_engine_scaling_benchmark_smoke_run_on_cpu(engines, tmp_path):
    out = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--engines", str(engines),
                             "--images", "5", "--batch-size", "2", "--gpus", "1", "2", "--threads", "1",
                             "--work", str(tmp_path / "work"), "--out", str(out)],
                            env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    scale = json.loads(out.read_text())
    assert scale["card"] == "cpu" and scale["gpus"] == [1, 2] and scale["same_samples"] == [True, True]
    for row in scale["rows"]:
        config = json.loads((tmp_path / "work" / f"generate-{row['gpus']}" / "config.json").read_text())
        assert row["world_size"] == row["gpus"] and row["sampling_seconds"] == config["sampling_seconds"]
        assert row["sampled_images"] == 5 - 2 * row["gpus"]  # each rank's first shard is its warm-up
        assert row["images_per_s"] == pytest.approx(row["sampled_images"] / config["sampling_seconds"])
        assert row["fixed_batch"] == 2 and row["engines_unchanged"] and row["warmup_seconds"] > 0
        assert [r["sampled_images"] for r in config["ranks"]] == ([1, 0] if row["gpus"] == 2 else [3])
        parts = sum(row[f"{name}_seconds"] for name in ("load", "warmup", "sampling", "merge", "other"))
        assert parts == pytest.approx(row["command_seconds"])
    one, two = scale["images_per_s"]
    assert scale["efficiency"] == pytest.approx([1.0, two / (2 * one)])
    # a rerun keeps both runs (state) and writes the same result
    rerun = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--engines", str(engines),
                            "--images", "5", "--batch-size", "2", "--gpus", "1", "2", "--threads", "1",
                            "--work", str(tmp_path / "work"), "--out", str(out)],
                           env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0 and "+ " not in rerun.stderr and json.loads(out.read_text()) == scale
