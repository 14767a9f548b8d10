"""`qandc serve` under load: throughput and p50 / p99 latency against offered load and --max-batch, and the offline
throughput of `Pipeline.generate` at the same batch size (images per second of its sampling time), which the server
should approach under saturating load.

For each --max-batch: a server (`python -m qandc serve`, a subprocess) driven by asyncio httpx clients in
--client-processes processes with requests of --images-per-request images: a closed loop that keeps the queue full
gives the saturating rate; then open-loop Poisson arrivals at fractions of it give latency against offered load.
Then the offline rate (the engines loaded here, median of timed runs after a warm-up; read twice, the higher of the
two counts: a disturbed reading shows as a gap). The server's engine process is also timed alone (no server, no
client) at the same batch size, to tell a slower process from the load around it; alone and in the server, an engine
batch's time is split into its launch (wall and CPU: noise, launches, replays queued) and its wait for the GPU, to
tell a host-bound batch from a GPU-bound one. Each of these phases is kept in --state as it ends (a run stopped by a
time limit resumes at the next on the same machine) and each finished --max-batch (a rerun skips it); --budget-s
stops before the next --max-batch (exit 3: rerun to resume).

Engines: --engines DIR, or built into --work: on a GPU the shipped reference model with a quick W8A8-INT8 recipe under
the default plan's shape (Inductor engines, compiled for every bucket's rows); on the CPU a tiny float DiT (ONNX
Runtime engines). Writes benchmarks/results/serve-<card>.json (headline keys `throughput_ratio_vs_generate` and
`p99_over_p50_at_half_load`, at the largest --max-batch) and serve-<card>.png (serve-<card>-processes-N.* with
--engine-processes N > 1, serve-<card>-rungraphs.* with --run-graphs: one CUDA graph a whole sampling run, offline
and in the server alike).

    python benchmarks/serve_load.py                                  # GPU: reference model, max-batch 16 and 64
    python benchmarks/serve_load.py --max-batch 4,16 --duration-s 6  # the CPU run (tiny ORT engines)
    python benchmarks/serve_load.py --max-batch 64 --engine-processes 2  # a server of two engine processes
    python benchmarks/serve_load.py --max-batch 64 --run-graphs          # whole-run CUDA graphs
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from qandc.artifacts import atomic_path, read_json, write_json
from qandc.bench import card_name, device_name, sitting
from qandc.runtime import Pipeline
from qandc.serve import batch_buckets, warm_up_batches

ROOT = Path(__file__).resolve().parents[1]
LOAD_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)
START_AHEAD = 0.5  # seconds from the client processes' barrier to their shared start (`run_clients`)


def build_engines_here(work: Path, max_batches: list[int], cache: str) -> Path:
    """The engines of this device (kept in `work`): the reference model's W8A8-INT8 Inductor engines on a GPU (the
    bench's `config_engines`), a tiny DiT's ONNX Runtime engines on the CPU."""
    from qandc.bench import config_engines, config_plan, make_model

    if torch.cuda.is_available():
        rows = sorted({2 * size if guided else size for max_batch in max_batches  # what each server's warm-up runs
                       for size, guided in warm_up_batches(batch_buckets(max_batch))})
        return config_engines("reference", make_model("reference", "cuda"), "w8a8-int8", cache, work, rows)[0]
    out = work / "engines-cpu"
    if (out / "manifest.json").is_file():
        return out
    from qandc.engines import build_engines
    from qandc.exporter import export
    from qandc.model import DiT, DiTConfig, initialize_weights

    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                       num_classes=10, learn_sigma=True, guidance="all")
    model = initialize_weights(DiT(config), seed=0, zero_init=False).eval()
    export(model, work / "onnx", plan=config_plan(cache))
    build_engines(work / "onnx", out, "onnxruntime")
    return out


def offline_rate(engines: Path, batch: int, steps: int | None, runs: int, run_graphs: bool = False) -> float:
    """Images per second of Pipeline.generate at `batch` images (median over `runs`, after a warm-up run)."""
    pipeline = Pipeline.load(engines, run_graphs=run_graphs)
    labels = [i % pipeline.config.num_classes for i in range(batch)]

    def once(seed):
        started = time.perf_counter()
        pipeline.generate(labels, seed, steps, sample_ids=range(batch))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started
    return median_rate(once, batch, runs)


# where an engine batch's seconds go (engine_process.LaunchedBatch): its launch's wall and CPU time, the wait after
BATCH_TIMES = ("host_seconds", "cpu_seconds", "wait_seconds")


def median_rate(once, batch: int, runs: int) -> float:
    """`batch` over the median of `runs` timed calls `once(seed)` (seeds 1..runs), after a warm-up call (seed 0)."""
    once(0)
    return batch / statistics.median(once(seed) for seed in range(1, runs + 1))


def engine_process_rate(engines: Path, batch: int, steps: int | None, runs: int, run_graphs: bool = False) -> tuple:
    """Images per second of the server's engine process alone (`EngineProcess.generate` at `batch` images, no server
    and no client; its own sampling seconds, median over `runs` after a warm-up run), and a batch's median times in
    ms (`BATCH_TIMES` and `seconds`): where the server's engines run slower than `offline_rate`, this tells the
    process from the load around it. One batch waits in the pipe while one runs, as the server hands them over."""
    from qandc.serve.engine_process import EngineProcess

    process = EngineProcess(engines, run_graphs=run_graphs)
    try:
        defaults = process.sampler_defaults
        labels = [i % process.config.num_classes for i in range(batch)]
        runs_done = []

        def submit(seed):
            process.submit(labels, [seed] * batch, steps or defaults.steps, defaults.sampler, defaults.cfg_scale,
                           range(batch))

        def once(seed):
            submit(seed + 1)  # the next batch waits while this one's result comes back
            process.result()
            runs_done.append(process.last_run)
            return process.last_run["seconds"]
        submit(0)
        rate = median_rate(once, batch, runs)
        process.result()
        return rate, {k: 1e3 * statistics.median(r[k] for r in runs_done[1:]) for k in ("seconds", *BATCH_TIMES)}
    finally:
        process.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(engines: Path, max_batch: int, args, log: Path) -> tuple:
    """The server as a subprocess, its output in `log` (whose tail a failed start shows)."""
    port = free_port()
    command = [sys.executable, "-m", "qandc", "serve", str(engines), "--port", str(port), "--max-batch",
               str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-images", str(args.images_per_request),
               "--max-queue", str(64 * max_batch), "--timeout-s", "300", "--engine-processes",
               str(args.engine_processes)] + (["--run-graphs"] if args.run_graphs else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 540
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"qandc serve exited with {process.returncode}: {' '.join(command)}\n{tail}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"qandc serve did not become ready within 540 s (its output: {log})")


def stop_server(process) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def request_body(i: int, images: int, num_classes: int, steps: int | None) -> dict:
    body = {"labels": [(i * images + k) % num_classes for k in range(images)], "seed": i}
    return body if steps is None else {**body, "steps": steps}


def engine_counters(text: str) -> dict:
    """From the server's /metrics: engine batches run, their real and padding images, their seconds so far and where
    those went (the engine process's launch wall and CPU time and its wait for the device); the server process's
    garbage collections' seconds and its full (generation 2) collections; its event loop's wake-ups late by more
    than 10 ms, and their lateness in all."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    values = {s.name: s.value for s in samples}
    on_time = next(s.value for s in samples if s.name == "qandc_serve_loop_lag_seconds_bucket"
                   and float(s.labels["le"]) == 0.01)
    return {"batches": values["qandc_serve_batch_images_count"], "images": values["qandc_serve_batch_images_sum"],
            "padding": values["qandc_serve_padded_images_total"],
            "seconds": values["qandc_serve_sampling_seconds_total"],
            "gc_seconds": sum(s.value for s in samples if s.name == "qandc_serve_gc_seconds_total"),
            "gc_full": sum(s.value for s in samples if s.name == "qandc_serve_gc_collections_total"
                           and s.labels["generation"] == "2"),
            "loop_stalls": values["qandc_serve_loop_lag_seconds_count"] - on_time,
            "loop_lag": values["qandc_serve_loop_lag_seconds_sum"],
            **{k: values[f"qandc_serve_engine_{k}_total"] for k in BATCH_TIMES}}


def server_counters(url: str) -> dict:
    """`engine_counters` of the server at `url` now."""
    return engine_counters(httpx.get(url + "/metrics", timeout=60).text)


def engine_share(before: dict, after: dict, window: float, processes: int = 1) -> dict:
    """What the engines (`processes` engine processes) did in a window: the share of it they were busy (a
    process's mean), their own images/s were all of them busy throughout (the offline rate's counterpart) and the
    mean real images a batch and the share of the images run that were padding — where a shortfall against the
    offline rate goes: idle engines (the HTTP side or batch forming), smaller or padded batches, or slower batches;
    and the server's garbage collections (seconds, full ones), which stop its threads, and its event loop's stalls
    (wake-ups late by more than 10 ms, and the lateness of all): latency tails."""
    batches, images, padding, seconds = (after[k] - before[k] for k in ("batches", "images", "padding", "seconds"))
    return {"engine_busy_share": seconds / (window * processes),
            "engine_images_per_s": images * processes / seconds if seconds else None,
            "mean_batch_images": images / batches if batches else None,
            "padding_share": padding / (images + padding) if batches else None,
            "server_gc": {"seconds": after["gc_seconds"] - before["gc_seconds"],
                          "full_collections": after["gc_full"] - before["gc_full"]},
            "server_loop": {"stalls_over_10ms": after["loop_stalls"] - before["loop_stalls"],
                            "lag_seconds": after["loop_lag"] - before["loop_lag"]},
            "batch_ms": {k: 1e3 * (after[k] - before[k]) / batches if batches else None
                         for k in ("seconds", *BATCH_TIMES)}}


def loop_cpu_seconds(pid: int) -> float | None:
    """CPU seconds the server's main thread (its asyncio loop: HTTP, validation, responses) has used; None without
    Linux's /proc. Per request, times the request rate, it is the share of the GIL the HTTP side takes from the
    inference thread."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_loop(url: str, concurrency: int, seconds: float, images: int, classes: int, steps,
                pid: int | None = None, processes: int = 1, clients: int = 1) -> dict:
    """`concurrency` clients posting back to back, spread over `clients` client processes: the saturating rate
    (after a warm-up of a quarter of the time), with what the engines did meanwhile (`engine_share`), the share of a
    core the busiest client process used (near 1: the load generator, not the server, set the rate) and, given the
    server's `pid`, its loop's CPU per request."""
    shares = [concurrency // clients + (k < concurrency % clients) for k in range(clients)]
    counters = []

    def scrape():
        counters.append({**server_counters(url),
                         "loop_cpu": loop_cpu_seconds(pid) if pid else None})

    def window(start: float) -> None:  # the parent's part: the server's counters where the measured window opens
        time.sleep(max(0.0, start + seconds / 4 - time.time()))  # and closes
        scrape()
        time.sleep(max(0.0, start + seconds * 1.25 - time.time()))
        scrape()

    parts = run_clients(_closed_clients, [dict(url=url, concurrency=n, seconds=seconds, images=images,
                                               classes=classes, steps=steps, first_request=k * 10 ** 7)
                                          for k, n in enumerate(shares) if n], window)
    done = [latency for part in parts for latency in part["latencies"]]
    before, after = counters
    loop_cpu = after["loop_cpu"] - before["loop_cpu"] if after["loop_cpu"] is not None else None
    requests = (after["images"] - before["images"]) / images
    return {"concurrency": concurrency, "client_processes": len(parts), "requests_per_s": len(done) / seconds,
            "images_per_s": len(done) * images / seconds, **percentiles(done),
            **engine_share(before, after, seconds, processes),
            "client_cpu_share": max(part["cpu_share"] for part in parts),
            "loop_cpu_ms_per_request": loop_cpu / requests * 1e3 if loop_cpu is not None and requests else None}


def http_client(url: str) -> httpx.AsyncClient:
    """A load generator's client: no limit on connections, and every one it opened kept alive."""
    return httpx.AsyncClient(base_url=url, timeout=300,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def open_connections(http: httpx.AsyncClient, count: int) -> None:
    """Open `count` connections before the load starts (concurrent GET /healthz; they stay in the pool), so that no
    measured request waits on its own or on the client's first-use setup. In session 17's H200 run each load point
    began with ~3x its rate of requests for ~40 ms (at half load 15 requests, 60 images, reached the server within
    6 ms), which queued behind one another and made that point's p99. Four of them were the client processes' first
    requests, all due at the start (no longer: `_open_clients`); whether the clients or the server bunched the rest
    was not recorded then (each point now records the clients' lateness and the server loop's stalls)."""
    await asyncio.gather(*(http.get("/healthz") for _ in range(count)))


async def _closed_clients(url: str, concurrency: int, seconds: float, images: int, classes: int, steps,
                          first_request: int, start) -> dict:
    """One client process's part of `closed_loop`: latencies of the requests sent in the measured window (from a
    quarter of `seconds` after the start, the wall-clock time `start()` gives, to 1.25 `seconds` after it) and the
    share of a core it used there."""
    done, counter = [], iter(range(first_request, first_request + 10 ** 7))

    async def client(http):
        while time.time() < stop:
            sent = time.time()
            response = await http.post("/v1/generate", json=request_body(next(counter), images, classes, steps))
            if response.status_code == 200 and sent >= measure_from:
                done.append(time.time() - sent)

    async def cpu_at(at: float) -> float:
        await asyncio.sleep(max(0.0, at - time.time()))
        return time.process_time()

    async with http_client(url) as http:
        begin = start()
        await open_connections(http, concurrency)
        measure_from, stop = begin + seconds / 4, begin + seconds * 1.25
        *_, cpu_from, cpu_to = await asyncio.gather(*[client(http) for _ in range(concurrency)],
                                                    cpu_at(measure_from), cpu_at(stop))
    return {"latencies": done, "cpu_share": (cpu_to - cpu_from) / seconds}


def open_loop(url: str, rate: float, seconds: float, images: int, classes: int, steps, seed: int,
              processes: int = 1, clients: int = 1) -> dict:
    """Poisson arrivals at `rate` requests per second for `seconds` (`clients` client processes, each a Poisson
    stream of rate / clients): latency of each, how many were refused, how late the clients sent them."""
    before = server_counters(url)
    parts = run_clients(_open_clients, [dict(url=url, rate=rate / clients, seconds=seconds, images=images,
                                             classes=classes, steps=steps, seed=(seed, k),
                                             first_request=k * 10 ** 7) for k in range(clients)])
    after = server_counters(url)
    elapsed = max(part["elapsed"] for part in parts)
    latencies = [latency for part in parts for latency in part["latencies"]]
    late = [delay for part in parts for delay in part["late"]]
    return {"offered_requests_per_s": rate, "sent": sum(part["sent"] for part in parts),
            "refused": sum(sum(part["refused"].values()) for part in parts),
            "refused_by_status": {str(code): sum(part["refused"].get(code, 0) for part in parts)
                                  for code in sorted({c for part in parts for c in part["refused"]})},
            "images_per_s": len(latencies) * images / elapsed,
            **percentiles(latencies), **engine_share(before, after, elapsed, processes),
            "client_late_ms": {f"p{q}": float(np.percentile(late, q)) * 1e3 for q in (50, 99, 100)}}


async def _open_clients(url: str, rate: float, seconds: float, images: int, classes: int, steps, seed,
                        first_request: int, start) -> dict:
    """One client process's Poisson stream of `open_loop` from the wall-clock time `start()` gives, a quarter second's
    worth of connections opened before it: each request's latency and how late it went out (a late client sends its
    overdue requests at once: a burst the Poisson stream does not have)."""
    rng = np.random.default_rng(seed)
    latencies, refused, late = [], {}, []

    async def one(http, i, due_at):
        sent = time.time()
        late.append(sent - due_at)
        response = await http.post("/v1/generate", json=request_body(i, images, classes, steps))
        if response.status_code == 200:
            latencies.append(time.time() - sent)
        else:
            refused[response.status_code] = refused.get(response.status_code, 0) + 1

    async with http_client(url) as http:
        begin = start()
        await open_connections(http, math.ceil(rate / 4) + 4)
        tasks, due, i = [], rng.exponential(1 / rate), 0  # a Poisson stream's first arrival too comes after a gap
        # (at 0 every client process sent one at the same instant: the point's first batch held one of each)
        while due < seconds:
            await asyncio.sleep(max(0.0, begin + due - time.time()))
            tasks.append(asyncio.ensure_future(one(http, first_request + i, begin + due)))
            due, i = due + rng.exponential(1 / rate), i + 1
        await asyncio.gather(*tasks)
    return {"latencies": latencies, "refused": refused, "sent": i, "elapsed": time.time() - begin, "late": late}


def run_clients(clients, parts: list[dict], during=None) -> list[dict]:
    """`clients(**part, start=...)` (a coroutine function of this module) in a spawned process a part, all from one
    wall-clock time, which `start()` gives each once every process is up, START_AHEAD seconds ahead (time to open
    connections: opened earlier, they could idle out, uvicorn closing them after 5 s, while slower processes start);
    `during(start)` runs here meanwhile.
    One asyncio httpx client process is slow at many concurrent requests (encode/httpx#3215): on the H200 machine
    one took 64% of a core at 174 requests a second, and the batches it fed fell from 64 images to ~24 within the
    saturating run."""
    context = multiprocessing.get_context("spawn")
    ready, starts, results = context.Barrier(len(parts) + 1), context.Queue(), context.Queue()
    workers = [context.Process(target=_client_process, args=(clients.__name__, part, ready, starts, results),
                               daemon=True) for part in parts]
    for worker in workers:
        worker.start()
    ready.wait(timeout=120)
    start = time.time() + START_AHEAD
    for _ in workers:
        starts.put(start)
    if during is not None:
        during(start)
    out = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    failed = [o["error"] for o in out if "error" in o]
    if failed:
        raise SystemExit(f"a client process failed: {failed[0]}")
    return out


def _client_process(name: str, part: dict, ready, starts, results) -> None:
    def start() -> float:  # the start shared by every client process, once they are all up
        ready.wait(timeout=120)
        return starts.get()

    try:
        results.put(asyncio.run(globals()[name](**part, start=start)))
    except Exception as e:  # the parent reports it
        results.put({"error": f"{type(e).__name__}: {e}"})


def batch_times(ms: dict) -> str:
    """A batch's times (`engine_share`'s batch_ms) in a line: where an engine batch's time went."""
    if ms["seconds"] is None:
        return "no batch"
    return (f"{ms['seconds']:.1f} ms: launching {ms['host_seconds']:.1f} (CPU {ms['cpu_seconds']:.1f}), waiting for "
            f"the device {ms['wait_seconds']:.1f}")


def failed_requests(point: dict) -> int:
    """Requests of a max-batch point's load runs that the server failed (500: non-finite samples, engine errors),
    as against those it turned away for load (503: queue full; 504: no result in time)."""
    return sum(load["refused_by_status"].get("500", 0) for load in point["loads"])


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_s": None, "p99_s": None, "completed": 0}
    return {"p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
            "completed": len(latencies)}


def measure(engines: Path, max_batch: int, args, partial: Path) -> dict:
    """One --max-batch: the saturating rate and latency at fractions of it, the offline rate, the engine process
    alone. Finished phases are kept in `partial` (a run stopped by its time limit resumes at the next phase on the
    same machine, `sitting`; on another one it starts over: its readings compare one sitting's only)."""
    classes = read_json(engines / "manifest.json")["model"]["num_classes"]
    done, here = read_json(partial) if partial.is_file() else {}, sitting()
    if done.get("sitting") != here:
        done = {"sitting": here}

    def offline() -> float:
        rate = offline_rate(engines, max_batch, args.steps, args.runs, args.run_graphs)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the offline engines are gone: the GPU is the next one's alone
        print(f"max-batch {max_batch}: offline {rate:.1f} images/s", flush=True)
        return rate

    def alone() -> dict:
        rate, ms = engine_process_rate(engines, max_batch, args.steps, args.runs, args.run_graphs)
        print(f"max-batch {max_batch}: the engine process alone {rate:.1f} images/s; a batch {batch_times(ms)}",
              flush=True)
        return {"images_per_s": rate, "batch_ms": ms}

    # the phases in their order: the server under load first (the costly one: its warm-up captures every bucket),
    # then the offline rate, the engine process alone, the offline rate again (the higher offline reading counts: a
    # disturbed one shows as a gap)
    phases = {"served": lambda: served(engines, max_batch, classes, args), "offline": offline, "alone": alone,
              "offline_again": offline}
    for phase, run in phases.items():
        if phase not in done:
            done[phase] = run()
            write_json(partial, done)
    saturating, loads = done["served"]["saturating"], done["served"]["loads"]
    readings = [done["offline"], done["offline_again"]]
    half = next(p for p in loads if p["fraction"] == 0.5)
    return {"max_batch": max_batch, "offline_images_per_s": max(readings), "offline_readings": readings,
            "engine_process_alone_images_per_s": done["alone"]["images_per_s"],
            "engine_process_alone_batch_ms": done["alone"]["batch_ms"], "saturating": saturating, "loads": loads,
            "throughput_ratio_vs_generate": saturating["images_per_s"] / max(readings),
            "p99_over_p50_at_half_load": half["p99_s"] / half["p50_s"]}


def served(engines: Path, max_batch: int, classes: int, args) -> dict:
    """A server at `max_batch`: its saturating rate (a closed loop), then latency at fractions of it (open loops)."""
    process, url = start_server(engines, max_batch, args, Path(args.state) / f"server-{max_batch}.log")
    try:
        # batches' worth of clients: one running and one handed over behind it a process, a full one queued when
        # either ends, one on its way back, one spare (with one fewer, an H200 run's batches fell to ~24 images
        # once the clients lagged)
        batches = 2 * args.engine_processes + 3
        concurrency = batches * max(1, max_batch // args.images_per_request) + 2
        saturating = closed_loop(url, concurrency, args.duration_s, args.images_per_request, classes, args.steps,
                                 process.pid, args.engine_processes, args.client_processes)
        print(f"  saturating: {saturating['images_per_s']:.1f} images/s, p50 {saturating['p50_s']:.3f} s; engines "
              f"busy {saturating['engine_busy_share']:.0%} at {saturating['engine_images_per_s']:.1f} images/s, "
              f"{saturating['mean_batch_images']:.1f} images a batch ({batch_times(saturating['batch_ms'])}); loop CPU "
              f"{saturating['loop_cpu_ms_per_request'] or float('nan'):.2f} ms a request; client "
              f"{saturating['client_cpu_share']:.0%} of a core (the busiest of {saturating['client_processes']} "
              "client processes)", flush=True)
        loads = []
        for k, fraction in enumerate(LOAD_FRACTIONS):
            point = open_loop(url, fraction * saturating["requests_per_s"], args.duration_s,
                              args.images_per_request, classes, args.steps, seed=k, processes=args.engine_processes,
                              clients=args.client_processes)
            loads.append({"fraction": fraction, **point})
            print(f"  {fraction:.2f} x: {point['images_per_s']:.1f} images/s, p50 {point['p50_s']:.3f} s, "
                  f"p99 {point['p99_s']:.3f} s, refused {point['refused']}; engines busy "
                  f"{point['engine_busy_share']:.0%}, {point['mean_batch_images'] or 0:.1f} images a batch, "
                  f"{point['padding_share'] or 0:.0%} of them padding; server GC {point['server_gc']['seconds']:.3f} s "
                  f"({point['server_gc']['full_collections']:.0f} full); its loop stalled "
                  f"{point['server_loop']['stalls_over_10ms']:.0f} times; requests sent late by "
                  f"{point['client_late_ms']['p99']:.1f} ms at p99", flush=True)
    finally:
        stop_server(process)
    return {"saturating": saturating, "loads": loads}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, point in enumerate(result["points"]):
        rates = [p["offered_requests_per_s"] * result["images_per_request"] for p in point["loads"]]
        label = f"max-batch {point['max_batch']}"
        left.plot(rates, [p["p50_s"] for p in point["loads"]], "o-", color=f"C{i}", label=f"{label} p50")
        left.plot(rates, [p["p99_s"] for p in point["loads"]], "s--", color=f"C{i}", label=f"{label} p99")
        right.plot(rates, [p["images_per_s"] for p in point["loads"]], "o-", color=f"C{i}", label=label)
        right.axhline(point["offline_images_per_s"], color=f"C{i}", linestyle=":",
                      label=f"{label}: offline generate")
    left.set(xlabel="offered load (images / s)", ylabel="latency (s)", yscale="log",
             title=f"qandc serve latency ({result['card']}, {result['images_per_request']} images a request)")
    right.set(xlabel="offered load (images / s)", ylabel="served images / s", title="throughput")
    for ax in (left, right):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--engines", help="engine folder (default: built into --work for this device)")
    parser.add_argument("--cache", default="default-shape" if gpu else "interval=3",
                        help="cache plan of the built engines: default-shape (the shape of the plan the default "
                             "search picks) or a fixed plan spec")
    parser.add_argument("--max-batch", default="16,64" if gpu else "4,16", help="comma-separated --max-batch values")
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--engine-processes", type=int, default=1,
                        help="the server's engine processes (qandc serve --engine-processes); points kept apart")
    parser.add_argument("--run-graphs", action="store_true",
                        help="one CUDA graph a whole sampling run, offline and in the server (qandc serve "
                             "--run-graphs); points kept apart")
    parser.add_argument("--client-processes", type=int, default=4 if gpu else 1,
                        help="load-generating processes (one asyncio httpx client takes ~3.7 ms of CPU a request)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the engines')")
    parser.add_argument("--duration-s", type=float, default=10.0 if gpu else 8.0, help="per load point")
    parser.add_argument("--runs", type=int, default=20, help="timed offline runs (median)")
    parser.add_argument("--state", default=".serve-load-state", help="finished --max-batch points")
    parser.add_argument("--work", default="/tmp/qandc-serve-load", help="built engines and compile caches")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no --max-batch after this long, the first included (one takes 5-6 minutes on "
                             "a GPU; building the engines there 3-4): a rerun resumes with the engines built")
    args = parser.parse_args()
    started, card, load_average = time.perf_counter(), card_name(), os.getloadavg()[0]  # a shared CPU skews it
    state, work = Path(args.state), Path(args.work)
    state.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    max_batches = [int(b) for b in args.max_batch.split(",")]
    variant = (f"-processes-{args.engine_processes}" if args.engine_processes > 1 else "") + \
        ("-rungraphs" if args.run_graphs else "")  # in state and result names
    engines = Path(args.engines) if args.engines else build_engines_here(work, max_batches, args.cache)
    print(f"engines ready at {time.perf_counter() - started:.0f} s", flush=True)
    for max_batch in max_batches:
        done = state / f"{card}-max-batch-{max_batch}{variant}.json"
        if done.is_file():
            continue
        if time.perf_counter() - started > args.budget_s:  # a fresh machine may spend it building the engines
            print(f"budget of {args.budget_s:.0f} s spent: rerun to resume")
            return 3
        write_json(done, measure(engines, max_batch, args, done.with_suffix(".phases.json")))
        print(f"max-batch {max_batch} done at {time.perf_counter() - started:.0f} s", flush=True)
    manifest = read_json(engines / "manifest.json")
    points = [read_json(state / f"{card}-max-batch-{b}{variant}.json") for b in max_batches]
    headline = max(points, key=lambda p: p["max_batch"])
    result = {
        "card": card, "device_name": device_name(),
        "engines": {"backend": manifest["backend"], "precision": (manifest.get("recipe") or {}).get("preset", "float"),
                    "model": manifest["model"], "plan": manifest["plan"], "sampler": manifest["sampler"],
                    "source": "given --engines" if args.engines else f"built here ({args.cache})"},
        "images_per_request": args.images_per_request, "max_wait_ms": args.max_wait_ms, "steps": args.steps,
        "engine_processes": args.engine_processes, "client_processes": args.client_processes,
        "run_graphs": args.run_graphs,
        "duration_s": args.duration_s, "load_average_at_start": load_average,
        "load_fractions": list(LOAD_FRACTIONS), "headline_max_batch": headline["max_batch"],
        "throughput_ratio_vs_generate": headline["throughput_ratio_vs_generate"],
        "p99_over_p50_at_half_load": headline["p99_over_p50_at_half_load"],
        "failed_requests": failed_requests(headline), "points": points,
        "targets": {"throughput_ratio_vs_generate": ">= 0.9 (GPU)", "p99_over_p50_at_half_load": "<= 2 (GPU)",
                    "failed_requests": "0"},
    }
    results = Path(args.results)
    write_json(results / f"serve-{card}{variant}.json", result)
    plot(result, results / f"serve-{card}{variant}.png")
    print({k: result[k] for k in ("card", "headline_max_batch", "throughput_ratio_vs_generate",
                                  "p99_over_p50_at_half_load", "failed_requests")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
