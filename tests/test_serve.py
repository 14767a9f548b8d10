"""`qandc serve`: the real server (uvicorn on a free port) over tiny ONNX Runtime engines, spoken to over HTTP."""

import asyncio
import base64
import contextlib
import gc
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.sampling import CachePlan

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from qandc.artifacts import sha256_file  # noqa: E402
from qandc.engines import build_engines  # noqa: E402
from qandc.errors import QandcError  # noqa: E402
from qandc.exporter import export  # noqa: E402
from qandc.images import model_to_images, to_uint8  # noqa: E402
from qandc.runtime import Pipeline  # noqa: E402
from qandc.serve import EngineProcess, ServeOptions, batch_buckets, create_app, warm_up_batches  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import batching_model  # noqa: E402
import serve_load  # noqa: E402

NAN_CLASS = 7  # its label embedding is NaN: every sample of this class comes out NaN, and only those
STEPS = 8
SLOW_STEPS = 1000  # a batch that takes a while (0.25-0.7 s on 2 CPU cores), to fill the queue behind it


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Float ONNX Runtime engines of a tiny one-channel (image-space) DiT with an interval-3 cache plan."""
    model = tiny_model(guidance="all", in_channels=1)
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[NAN_CLASS] = float("nan")
    root = tmp_path_factory.mktemp("serve")
    export(model, root / "onnx", plan=CachePlan.interval(3))
    build_engines(root / "onnx", root / "engines", "onnxruntime")
    return root / "engines"


@contextlib.contextmanager
def running(engine_dir, vae=None, **options):
    """A server on a free port in a thread, its engines in their own process; yields (base URL, app); stops it as
    SIGTERM does (should_exit)."""
    options = ServeOptions(**options)
    app = create_app([EngineProcess(engine_dir) for _ in range(options.engine_processes)], engine_dir, options, vae)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(url, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/readyz").status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready")


def post_all(url, bodies, timeout=60.0):
    """POST every body to /v1/generate at once; the responses in order."""
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            return await asyncio.gather(*[client.post("/v1/generate", json=body) for body in bodies])
    return asyncio.run(go())


def metric(url, name, **labels) -> float:
    """A sample of /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def samples_of(response) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(response.json()["npz"])))["samples"]


@pytest.fixture(scope="module")
def server(engines):
    with running(engines, max_batch=8, max_images=4, max_wait_ms=300) as (url, app):
        yield url


@pytest.mark.parametrize("max_batch", [1, 2, 7, 16, 20, 64, 100, 256])
def test_buckets_pad_a_batch_by_less_than_half_beyond_8_images_and_the_warm_up_runs_each_shape(max_batch):
    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[0] == 1 and buckets[-1] == max_batch
    for images in range(1, max_batch + 1):
        padded = next(b for b in buckets if b >= images)
        assert padded < (1.5 * images if images > 8 else 2 * images)
    warmed_rows = {2 * size if guided else size for size, guided in warm_up_batches(buckets)}
    assert all(2 * size in warmed_rows and size in warmed_rows for size in buckets)  # guided and unguided batches
    assert len(warm_up_batches(buckets)) == len(warmed_rows)  # no shape warmed twice


def test_images_equal_generate_whatever_they_are_batched_with(engines, server, tmp_path):
    from qandc.cli import main

    assert main(["generate", "--engines", str(engines), "--labels", "1,2,3", "--seed", "5", "--steps", str(STEPS),
                 "--out", str(tmp_path / "g")]) == 0
    expected = np.load(tmp_path / "g" / "samples.npz")["samples"]
    batches = metric(server, "qandc_serve_batch_images_count")
    a, b, c, d = post_all(server, [
        {"labels": [1, 2, 3], "seed": 5, "steps": STEPS, "format": "npz"},
        {"labels": [3], "seed": 5, "sample_ids": [2], "steps": STEPS, "format": "npz"},
        {"labels": [4, 4], "seed": 9, "steps": STEPS},
        {"labels": [1, 2, 3], "seed": 5, "steps": STEPS, "format": "png"}])
    assert [r.status_code for r in (a, b, c, d)] == [200] * 4
    assert metric(server, "qandc_serve_batch_images_count") - batches == 2  # 9 images, 8 a batch: 2
    assert np.array_equal(samples_of(a), expected)  # bitwise, batched with other seeds and labels
    assert np.array_equal(samples_of(b), expected[2:3])
    pngs = [np.array(Image.open(io.BytesIO(base64.b64decode(p)))) for p in d.json()["images"]]
    config = Pipeline.load(engines).config
    assert np.array_equal(np.stack(pngs), to_uint8(model_to_images(torch.from_numpy(expected), config))[..., 0])
    body = a.json()
    assert body["config"] == {"steps": STEPS, "sampler": "ddpm", "cfg_scale": 1.5, "seed": 5,
                              "plan": CachePlan.interval(3).describe(), "vc": False,
                              "noise_keying": "per sample: generator keyed by (seed, sample id)"}
    assert body["engines"]["manifest_sha256"] == sha256_file(engines / "manifest.json")
    assert a.headers["x-request-id"] == body["request_id"] != c.json()["request_id"]


def test_concurrent_requests_share_engine_batches(server):
    before = {name: metric(server, name) for name in ("qandc_serve_batch_images_count", "qandc_serve_images_total")}
    full = metric(server, "qandc_serve_engine_steps_total", kind="full")
    responses = post_all(server, [{"labels": [i], "seed": i, "steps": STEPS} for i in (0, 1, 2, 3, 4, 5)])
    assert all(r.status_code == 200 for r in responses)
    batches = metric(server, "qandc_serve_batch_images_count") - before["qandc_serve_batch_images_count"]
    assert 1 <= batches < 6
    assert metric(server, "qandc_serve_images_total") - before["qandc_serve_images_total"] == 6
    # interval 3 over 8 steps: 3 full steps a batch, not a request
    assert metric(server, "qandc_serve_engine_steps_total", kind="full") - full == 3 * batches


def test_the_servers_garbage_collections_are_timed_and_what_warm_up_left_is_frozen(server):
    before = serve_load.server_counters(server)
    gc.collect()  # the server runs in this process: its hook times this one
    after = serve_load.server_counters(server)
    assert after["gc_full"] - before["gc_full"] >= 1 and after["gc_seconds"] > before["gc_seconds"]
    assert metric(server, "qandc_serve_gc_frozen_objects") > 1000


def test_a_stalled_event_loop_shows_in_the_metrics(server):
    """Holding the GIL for 0.15 s stalls the server's loop (its thread): the loop's watch sees a wake-up late by more
    than 10 ms, which serve_load counts."""
    before = serve_load.server_counters(server)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the server's thread waits for this one's GIL instead of taking it after 5 ms
    try:
        until = time.perf_counter() + 0.15
        while time.perf_counter() < until:
            pass
    finally:
        sys.setswitchinterval(interval)
    time.sleep(0.05)
    after = serve_load.server_counters(server)
    share = serve_load.engine_share(before, after, 1.0)["server_loop"]
    assert share["stalls_over_10ms"] >= 1 and share["lag_seconds"] >= 0.1


def test_the_load_benchmark_reads_the_engines_share_from_metrics(server):
    before = serve_load.engine_counters(httpx.get(server + "/metrics").text)
    started = time.perf_counter()
    responses = post_all(server, [{"labels": [i, i + 1], "seed": i, "steps": STEPS} for i in (0, 2, 4)])
    wall = time.perf_counter() - started
    after = serve_load.engine_counters(httpx.get(server + "/metrics").text)
    timings = {(t["batch_images"], t["sampling_seconds"]) for t in (r.json()["timing"] for r in responses)}  # a batch
    assert after["images"] - before["images"] == 6 == sum(t[0] for t in timings)
    assert after["batches"] - before["batches"] == len(timings)
    assert after["seconds"] - before["seconds"] == pytest.approx(sum(t[1] for t in timings))
    share = serve_load.engine_share(before, after, wall)
    assert 0 < share["engine_busy_share"] < 1 and share["mean_batch_images"] == 6 / len(timings)
    batches = {(t["batch_padded"], t["sampling_seconds"]) for t in (r.json()["timing"] for r in responses)}
    padded = sum(size for size, _ in batches)
    assert share["padding_share"] == pytest.approx((padded - 6) / padded)


def test_the_load_benchmark_spreads_its_clients_over_processes(server):
    """The closed and the open loop of serve_load run in two client processes each: every request they count is
    one the server answered, and the open loop's two Poisson streams send about the rate asked for, none of it
    before its due time."""
    def answered() -> float:
        return sum(s.value for f in text_string_to_metric_families(httpx.get(server + "/metrics").text)
                   for s in f.samples if s.name == "qandc_serve_requests_total" and s.labels["status"] == "200")

    before = answered()
    classes = NAN_CLASS  # labels 0..6: none of them NaN
    closed = serve_load.closed_loop(server, 4, 2.0, 2, classes, STEPS, clients=2)
    assert closed["client_processes"] == 2 and closed["completed"] > 0
    assert 0 < closed["client_cpu_share"] < 2
    between = answered()
    assert between - before >= closed["completed"]
    opened = serve_load.open_loop(server, 10.0, 2.0, 2, classes, STEPS, seed=0, clients=2)
    assert opened["refused_by_status"] == {} and opened["completed"] == opened["sent"] == answered() - between
    assert 5 <= opened["sent"] <= 40  # 20 expected (Poisson, two streams of 5 a second for 2 s)
    late = opened["client_late_ms"]  # each request against its own stream's due time, from the shared start
    assert 0 <= late["p50"] <= late["p99"] <= late["p100"]


@pytest.mark.parametrize("body, status, message", [
    (b"{", 400, "not valid JSON"),
    (b"[1]", 422, "an object"),
    (b'{"labels": []}', 422, "labels"),
    (b'{"labels": [1, 2, 3, 4, 5]}', 422, "at most 4"),
    (b'{"labels": [10]}', 422, "out of range"),
    (b'{"labels": ["1"]}', 422, "labels.0"),
    (b'{"labels": [1], "seed": -1}', 422, "seed"),
    (b'{"labels": [1], "steps": 0}', 422, "steps"),
    (b'{"labels": [1], "steps": 1001}', 422, "steps"),
    (b'{"labels": [1], "sampler": "euler"}', 422, "sampler"),
    (b'{"labels": [1], "cfg_scale": NaN}', 422, "cfg_scale"),
    (b'{"labels": [1], "sample_ids": [1, 2]}', 422, "sample_ids"),
    (b'{"labels": [1], "format": "jpeg"}', 422, "format"),
    (b'{"labels": [1], "prompt": "a cat"}', 422, "prompt"),
    (b'{"labels": [1], "pad": "' + b"x" * 70000 + b'"}', 413, "limit"),
])
def test_bad_requests_get_one_json_error(server, body, status, message):
    response = httpx.post(server + "/v1/generate", content=body,
                          headers={"content-type": "application/json", "x-request-id": "req-42"})
    assert response.status_code == status
    assert response.json() == {"error": response.json()["error"], "request_id": "req-42"}
    assert message in response.json()["error"] and "\n" not in response.json()["error"]
    assert response.headers["x-request-id"] == "req-42"


def test_other_bad_requests(server):
    assert httpx.post(server + "/v1/generate", content=b'{"labels": [1]}').status_code == 415
    for response in (httpx.get(server + "/v1/generate"), httpx.get(server + "/nowhere")):
        assert response.status_code in (404, 405) and set(response.json()) == {"error", "request_id"}
    assert metric(server, "qandc_serve_requests_total", status="422") > 0


def test_a_nan_fails_only_its_own_request(server, caplog):
    """The poisoned sample's request fails, the other one of the batch does not; the server logs the batch's bucket
    and the row that came out not finite (the poisoned request's first sample: row 0 or 2, as the requests arrived)."""
    bad = metric(server, "qandc_serve_nonfinite_images_total")
    good, poisoned = post_all(server, [{"labels": [1, 2], "seed": 3, "steps": STEPS},
                                       {"labels": [NAN_CLASS, 1], "seed": 3, "steps": STEPS, "sample_ids": [4, 5]}])
    assert good.status_code == 200 and good.json()["timing"]["batch_images"] == 4  # they shared the batch
    assert poisoned.status_code == 500 and "sample ids [4]" in poisoned.json()["error"]
    assert metric(server, "qandc_serve_nonfinite_images_total") - bad == 1
    assert re.search(rf"a batch of 4 images \(bucket 4, {STEPS} steps\) came out not finite in rows \[[02]\]\n",
                     caplog.text)


def test_full_queue_is_503_and_a_client_that_leaves_frees_its_slot(engines):
    with running(engines, max_batch=1, max_images=1, max_queue=2, max_wait_ms=0) as (url, app):
        responses = post_all(url, [{"labels": [i], "seed": i, "steps": SLOW_STEPS} for i in range(6)])
        codes = [r.status_code for r in responses]
        # 1 running, 1 handed over behind it, 2 queued at most
        assert codes.count(503) >= 2 and codes.count(200) + codes.count(503) == 6
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 503)

        async def leave_early():
            async with httpx.AsyncClient(base_url=url) as client:
                def slow(label):
                    return asyncio.ensure_future(client.post("/v1/generate", json={"labels": [label],
                                                                                   "steps": SLOW_STEPS}))
                running_one = slow(1)
                await asyncio.sleep(0.05)  # it runs (SLOW_STEPS)
                handed_over = slow(2)
                await asyncio.sleep(0.05)  # it waits in the engine process's pipe
                with pytest.raises(httpx.ReadTimeout):  # leaves while the first still runs (its connecting may
                    # take longer on a loaded machine: only the wait for the answer is cut short)
                    await client.post("/v1/generate", json={"labels": [3], "steps": SLOW_STEPS},
                                      timeout=httpx.Timeout(5.0, read=0.05))
                return await running_one, await handed_over
        batches = metric(url, "qandc_serve_batch_images_count")
        assert [r.status_code for r in asyncio.run(leave_early())] == [200, 200]
        time.sleep(0.2)
        assert metric(url, "qandc_serve_requests_total", status="499") == 1
        assert metric(url, "qandc_serve_batch_images_count") - batches == 2  # the one that left never ran
        assert metric(url, "qandc_serve_queued_images") == 0


def test_a_full_batch_is_handed_over_while_another_runs(engines):
    with running(engines, max_batch=1, max_images=1, max_wait_ms=0) as (url, app):
        first, second = post_all(url, [{"labels": [i], "seed": i, "steps": SLOW_STEPS} for i in range(2)])
    assert first.status_code == second.status_code == 200
    timings = sorted((r.json()["timing"] for r in (first, second)), key=lambda t: t["queue_seconds"])
    # the later batch went to the engine process at once, not after the earlier one's sampling time
    assert timings[1]["queue_seconds"] < 0.3 * timings[0]["sampling_seconds"]


def test_two_engine_processes_run_batches_side_by_side(engines):
    """Two batches at once on two engine processes: the later request is back after about one batch's sampling
    time, not two (on one process the second waits in its pipe: latency ~ the sum), and each image is still the
    one `generate` gives for its seed and label."""
    bodies = [{"labels": [i], "seed": i, "steps": SLOW_STEPS, "format": "npz"} for i in range(2)]
    with running(engines, max_batch=1, max_images=1, max_wait_ms=0, engine_processes=2) as (url, app):
        started = time.perf_counter()
        responses = post_all(url, bodies)
        latest = time.perf_counter() - started
        assert {r.status_code for r in responses} == {200}
        assert metric(url, "qandc_serve_batch_images_count") == 2
    sampled = [r.json()["timing"]["sampling_seconds"] for r in responses]
    assert latest < 0.8 * sum(sampled), (latest, sampled)
    pipeline = Pipeline.load(engines)
    for body, response in zip(bodies, responses):  # bitwise
        assert np.array_equal(samples_of(response), pipeline.generate(body["labels"], body["seed"], SLOW_STEPS))


def test_an_engine_process_with_whole_run_graphs_launches_a_waiting_batch_before_collecting_the_one_before(engines):
    """With whole-run graphs the engine process launches the next batch, when one waits in the pipe, before it
    copies the current one's samples out (on a GPU its noise is drawn while the replay runs): replies still come in
    order, each batch's samples are `generate`'s, and the batches' seconds add up to no more than the time they
    took together (the overlap counted once), the first's spanning the second's launch."""
    process = EngineProcess(engines, run_graphs=True)
    batches = [([1, 2], [5, 5], [0, 1]), ([3, 4, 5], [6, 6, 9], [0, 1, 0]), ([6], [7], [2])]
    try:
        started = time.perf_counter()
        for labels, seeds, ids in batches:
            process.submit(labels, seeds, STEPS, "ddpm", 1.5, ids)
        results, runs = [], []
        for _ in batches:
            results.append(process.result())
            runs.append(process.last_run)
        took = time.perf_counter() - started
    finally:
        process.close()
    pipeline = Pipeline.load(engines)
    for (labels, seeds, ids), got in zip(batches, results):
        assert torch.equal(got, pipeline.generate(labels, seeds, STEPS, "ddpm", 1.5, sample_ids=ids))
    assert sum(run["seconds"] for run in runs) <= took
    assert runs[0]["seconds"] >= runs[0]["host_seconds"] + runs[1]["host_seconds"]
    assert all(run["cpu_seconds"] > 0 and run["wait_seconds"] >= 0 for run in runs)


def test_timeout_is_504(engines):
    with running(engines, max_batch=1, max_images=1, timeout_s=0.05) as (url, app):
        response = httpx.post(url + "/v1/generate", json={"labels": [1], "steps": SLOW_STEPS // 2})
        assert response.status_code == 504 and "0.05 s" in response.json()["error"]


def test_an_engine_process_that_dies_fails_its_batch_and_readiness(engines):
    with running(engines, max_batch=2, max_images=2) as (url, app):
        assert httpx.post(url + "/v1/generate", json={"labels": [1], "steps": STEPS}).status_code == 200
        app.state.engines[0].process.kill()
        app.state.engines[0].process.join(10)
        response = httpx.post(url + "/v1/generate", json={"labels": [1], "steps": STEPS})
        assert response.status_code == 500 and "the engine process exited" in response.json()["error"]
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "an engine process exited"


def test_an_engine_folder_that_fails_to_load_is_one_error_here(engines, tmp_path):
    broken = tmp_path / "engines"
    broken.mkdir()
    for f in engines.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    next(f for f in broken.iterdir() if f.suffix == ".onnx").write_bytes(b"not the engine")
    with pytest.raises(QandcError, match="sha256|checksum"):
        EngineProcess(broken)


def test_a_port_in_use_fails_at_once_before_the_engines_load(engines, tmp_path, capsys):
    from qandc.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # an engine folder that is not there: the port is refused before the engines are even read
        assert main(["serve", str(tmp_path / "no-engines"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qandc: error: cannot listen on 127.0.0.1:{port}: ") and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit, match="2"):  # a usage error, argparse's exit
        main(["serve", str(engines), "--port", "70000"])
    assert "--port: must be an integer from 0 to 65535" in capsys.readouterr().err


def test_a_vae_folder_that_is_none_fails_before_the_engines_load(tmp_path, capsys):
    from qandc.cli import main

    assert main(["serve", str(tmp_path / "no-engines"), "--port", "0", "--vae", str(tmp_path / "no-vae")]) == 2
    assert capsys.readouterr().err.strip() == (f"qandc: error: {tmp_path / 'no-vae'}: not a local diffusers "
                                               "AutoencoderKL (no config.json there)")


def test_a_shutdown_during_the_warm_up_stops_it(engines, caplog):
    from qandc.serve.batcher import Batcher

    process = EngineProcess(engines)
    try:
        batcher = Batcher([process], 4, 10.0, 16)
        batcher.close()  # as SIGTERM's shutdown does, here before the first warm-up batch
        with caplog.at_level("INFO", "qandc.serve"):
            asyncio.run(batcher.warm_up())
        assert not batcher.ready and "warm-up stopped: shutting down" in caplog.text
        assert "warm-up: a batch" not in caplog.text
    finally:
        batcher.executor.shutdown()
        process.close()


def test_latents_come_as_npz_or_through_the_vae_as_png(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from qandc.images import decode_latents, load_vae

    export(tiny_model(guidance="all"), tmp_path / "onnx", plan=CachePlan.interval(3))  # 4-channel latents
    build_engines(tmp_path / "onnx", tmp_path / "engines", "onnxruntime")
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)
                            ).save_pretrained(tmp_path / "vae")
    body = {"labels": [1, 2], "seed": 3, "steps": STEPS}
    with running(tmp_path / "engines") as (url, app):
        plain = httpx.post(url + "/v1/generate", json=body)
        assert plain.json()["format"] == "npz" and samples_of(plain).shape == (2, 4, 8, 8)
        refused = httpx.post(url + "/v1/generate", json={**body, "format": "png"})
        assert refused.status_code == 422 and "--vae" in refused.json()["error"]
    vae = load_vae(tmp_path / "vae")
    with running(tmp_path / "engines", vae) as (url, app):
        png, npz = post_all(url, [body, {**body, "format": "npz"}])
    assert np.array_equal(samples_of(npz), samples_of(plain))
    expected = to_uint8(decode_latents(torch.from_numpy(samples_of(npz)), vae))
    got = np.stack([np.array(Image.open(io.BytesIO(base64.b64decode(p)))) for p in png.json()["images"]])
    assert png.json()["format"] == "png" and np.array_equal(got, expected)


def test_serve_command_finishes_accepted_requests_on_sigterm(engines):
    """The CLI server: ready after warm-up of buckets 1 and 2; SIGTERM while requests run: every accepted one is
    answered, then it stops (uvicorn re-raises the signal once shut down: exit status -SIGTERM), having logged the
    request ids."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "qandc", "serve", str(engines), "--port", str(port),
                                "--max-batch", "2", "--max-wait-ms", "50"], env=env, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        assert httpx.get(url + "/readyz").json() == {"status": "ready", "buckets": [1, 2]}
        assert metric(url, "qandc_serve_batch_images_count") == 0  # warm-up is not counted as serving

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                posts = [asyncio.ensure_future(client.post("/v1/generate", json={"labels": [i], "steps": SLOW_STEPS},
                                                           headers={"x-request-id": f"term-{i}"}))
                         for i in range(4)]
                await asyncio.sleep(0.3)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*posts)
        responses = asyncio.run(go())
        assert [r.status_code for r in responses] == [200] * 4
        assert process.wait(30) == -signal.SIGTERM
    finally:
        process.kill()
    log = process.stderr.read()
    warmed = re.findall(r"warm-up: a batch of (\d) images, (\w+), in [\d.]+ s \(Inductor compilations by its cache: "
                        r"0 hit, 0 missed, 0 bypassed\)", log)  # ONNX Runtime engines compile nothing
    assert warmed == [("1", "guided"), ("1", "unguided"), ("2", "guided")], log
    assert all(re.search(f"request term-{i}: 1 images", log) for i in range(4)), log
    assert log.index("Shutting down") < max(log.index(f"request term-{i}:") for i in range(4))  # answered after
    assert "Finished server process" in log


def test_the_batching_model_runs_a_lone_request_after_the_wait_in_its_bucket():
    def batch_s(size):
        return 0.02 + 0.001 * size

    # a request every ~100 s: each waits max_wait (10 ms), then runs alone as its bucket (3 or 4 images as 4: 24 ms)
    for images in (3, 4):
        assert batching_model.latencies([1, 2, 4, 8], 0.01, images, 8, 0.01, batch_s, 1000, seed=0) == \
            pytest.approx((0.034, 0.034))
    # busy: queued requests wait for the batch ahead of them
    p50, p99 = batching_model.latencies([1, 2, 4, 8], 30, 4, 8, 0.01, batch_s, 100, seed=0)
    assert 0.034 < p50 < p99


def test_the_load_benchmark_counts_failed_requests_apart_from_those_turned_away():
    """500s (non-finite samples, engine errors) are failures; 503 (queue full, warming up) and 504 (no result in
    time) are the load turned away."""
    point = {"loads": [{"refused_by_status": {"500": 3, "503": 5}}, {"refused_by_status": {"504": 2}},
                       {"refused_by_status": {"500": 1}}]}
    assert serve_load.failed_requests(point) == 4
