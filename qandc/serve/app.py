"""The HTTP face of `qandc serve` (FastAPI): POST /v1/generate, GET /healthz, /readyz and /metrics (Prometheus).
Every error is one JSON object {"error", "request_id"} with a 4xx code for the client's mistakes, 503 (with
Retry-After) while warming up or when the queue is full, 504 on timeout, and 500 only for the server's own failures
(non-finite engine output for that request's samples, an engine error), never with a traceback."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import logging
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..artifacts import sha256_file
from ..errors import QandcError
from ..formats.recipe import vc_correction
from ..images import check_vae_folder, decode_latents, has_image_space, load_vae, model_to_images, to_pil, to_uint8
from ..sampling import SAMPLERS, check_labels, space_timesteps
from ..sampling.diffusion import TRAIN_STEPS
from .batcher import Batcher, BatchKey, BatchRun, Job, QueueFull
from .engine_process import EngineProcess

log = logging.getLogger("qandc.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NoNegative = Annotated[int, Field(ge=0, lt=2 ** 63)]
LAG_PERIOD = 0.01  # seconds: the event loop's watch (`watch_loop`)


@dataclass(frozen=True)
class ServeOptions:
    """Batching and limits: `max_batch` images per engine batch (padded to `batch_buckets`), `max_wait_ms` the
    oldest request waits for company, `max_queue` images waiting at most, `max_images` per request, `timeout_s` per
    request (queue and sampling), `max_body_bytes` per request body, `engine_processes` loading the engines on the
    device (batches run on them side by side; without NVIDIA MPS their CUDA contexts time-slice the GPU: two gave
    0.30x of `generate` on an H200 where one gave 0.60x)."""

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_images: int = 16
    timeout_s: float = 60.0
    max_body_bytes: int = 65536
    engine_processes: int = 1

    def __post_init__(self):
        if not 1 <= self.max_images <= self.max_batch <= self.max_queue:
            raise QandcError(f"need 1 <= --max-images ({self.max_images}) <= --max-batch ({self.max_batch}) <= "
                             f"--max-queue ({self.max_queue})")
        if not (self.max_wait_ms >= 0 and self.timeout_s > 0 and self.max_body_bytes > 0
                and self.engine_processes >= 1):
            raise QandcError("--max-wait-ms must be >= 0, --timeout-s and --max-body-kb > 0, --engine-processes >= 1")


class GenerateRequest(BaseModel):
    """POST /v1/generate: labels (one image each), the noise seed, sample ids (default 0..n-1: sample i of
    `qandc generate --seed S`), sampler settings (default: the engines' own), and the response format."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    labels: list[int] = Field(min_length=1)
    seed: NoNegative = 0
    sample_ids: list[NoNegative] | None = None
    steps: int | None = None
    sampler: Literal[SAMPLERS] | None = None  # type: ignore[valid-type]
    cfg_scale: float | None = None
    format: Literal["png", "npz"] | None = None


class ServeError(Exception):
    """An error response: HTTP `status`, a one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    """The Prometheus metrics of one server (its own registry)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qandc_serve_requests", "generate requests by HTTP status", ["status"], registry=r)
        self.images = Counter("qandc_serve_images", "images returned", registry=r)
        self.batch_images = Histogram("qandc_serve_batch_images", "real images per engine batch (its count: "
                                      "batches run)", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.padded_images = Counter("qandc_serve_padded_images", "padding images run to fill a bucket", registry=r)
        self.queue_seconds = Histogram("qandc_serve_queue_seconds", "time a request waited for its batch to be "
                                       "handed to the engines", registry=r)
        self.sampling_seconds = Counter("qandc_serve_sampling_seconds", "seconds the engines spent on batches "
                                        "(sampling and the copy out)", registry=r)
        self.host_seconds = Counter("qandc_serve_engine_host_seconds", "seconds the engine process spent launching "
                                    "batches (noise, launches, graph replays queued)", registry=r)
        self.cpu_seconds = Counter("qandc_serve_engine_cpu_seconds", "CPU seconds the engine process used launching "
                                   "batches", registry=r)
        self.wait_seconds = Counter("qandc_serve_engine_wait_seconds", "seconds the engine process waited for the "
                                    "device to finish a batch (near 0: the host is the limit)", registry=r)
        self.step_seconds = Histogram("qandc_serve_step_seconds", "sampling seconds per step of a batch",
                                      buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2), registry=r)
        self.engine_steps = Counter("qandc_serve_engine_steps", "sampling steps by engine kind (full, reuse)",
                                    ["kind"], registry=r)
        self.fallback_steps = Counter("qandc_serve_fallback_steps", "steps recomputed by the float model "
                                      "(--nan-fallback)", registry=r)
        self.nonfinite_images = Counter("qandc_serve_nonfinite_images", "images whose output was NaN / Inf (their "
                                        "requests failed)", registry=r)
        self.queued_images = Gauge("qandc_serve_queued_images", "images waiting for a batch", registry=r)
        self.loop_lag = Histogram("qandc_serve_loop_lag_seconds", f"how late the event loop woke from a "
                                  f"{LAG_PERIOD * 1e3:.0f} ms sleep (a stalled loop holds every request's reading, "
                                  f"queueing and answer)", buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1),
                                  registry=r)
        self.gc_pauses = GcPauses()
        r.register(self.gc_pauses)

    def batch(self, run: BatchRun, jobs: list[Job]) -> None:
        self.batch_images.observe(run.images)
        self.padded_images.inc(run.padded - run.images)
        self.sampling_seconds.inc(run.seconds)
        self.host_seconds.inc(run.host_seconds)
        self.cpu_seconds.inc(run.cpu_seconds)
        self.wait_seconds.inc(run.wait_seconds)
        self.step_seconds.observe(run.seconds / run.steps)
        for kind, count in run.engine_steps.items():
            self.engine_steps.labels(kind).inc(count)
        self.fallback_steps.inc(run.fallback_steps)
        self.nonfinite_images.inc(run.nonfinite)
        for job in jobs:
            self.queue_seconds.observe(job.batched - job.enqueued)


async def watch_loop(lag: Histogram) -> None:
    """Sleep LAG_PERIOD on the event loop, again and again, observing into `lag` how late each wake-up came: a long
    callback, a garbage collection or anything else holding the loop shows, as it stalls every request in flight."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PERIOD
        await asyncio.sleep(LAG_PERIOD)
        lag.observe(max(0.0, loop.time() - due))


class GcPauses:
    """The server process's garbage collections by generation, timed by a `gc.callbacks` hook (every thread waits
    while one runs: a full one over the ~300k objects torch and the server leave took 0.27 s on 2 CPU cores), as a
    Prometheus collector. The hook only adds up numbers: a collection can start while a thread holds a metric's lock."""

    def __init__(self):
        self.started, self.collections, self.seconds = None, [0, 0, 0], [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.collections[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self.started
            self.started = None

    def collect(self):
        seconds = CounterMetricFamily("qandc_serve_gc_seconds", "seconds the server process spent in garbage "
                                      "collections, by generation", labels=["generation"])
        collections = CounterMetricFamily("qandc_serve_gc_collections", "garbage collections of the server "
                                          "process, by generation", labels=["generation"])
        for generation in range(3):
            seconds.add_metric([str(generation)], self.seconds[generation])
            collections.add_metric([str(generation)], self.collections[generation])
        frozen = GaugeMetricFamily("qandc_serve_gc_frozen_objects", "objects out of the collector's reach since the "
                                   "server turned ready (gc.freeze)", value=gc.get_freeze_count())
        return [seconds, collections, frozen]


def request_id(request: Request) -> str:
    """The client's X-Request-ID when it is a plain token, else a new one; the same for the whole request."""
    if not hasattr(request.state, "request_id"):
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return request.state.request_id


def create_app(processes: list[EngineProcess], engine_dir: str | Path, options: ServeOptions = ServeOptions(),
               vae=None) -> FastAPI:
    """The service over the engine processes `processes` (each loaded from `engine_dir`): warms up every bucket at
    start (`/readyz` turns ready after), and on shutdown finishes the requests it accepted, then closes the engine
    processes. `vae` (a loaded diffusers AutoencoderKL) decodes latents into PNG images, on a thread of its own."""
    engines = processes[0]  # what every process loaded: the model, plan, sampler settings, manifest
    limit = engines.max_batch
    if limit is not None and 2 * options.max_batch > limit:
        raise QandcError(f"--max-batch {options.max_batch} needs {2 * options.max_batch} rows with guidance; the "
                         f"engines' profile holds {limit}")
    metrics = Metrics()
    batcher = Batcher(processes, options.max_batch, options.max_wait_ms, options.max_queue, metrics.batch)
    described = engine_metadata(engines, engine_dir)
    decoder = device_thread("qandc-vae", engines.device) if vae is not None else None  # CUDA here only for a VAE

    def warmed(started: float) -> None:
        """Once ready: the objects alive now (torch's, the server's) leave the garbage collector's generations
        (`gc.freeze`), so that a full collection, which stops every thread, walks only what serving allocates."""
        if batcher.ready:
            gc.freeze()
            log.info("ready: %d buckets %s warmed in %.1f s", len(batcher.buckets), batcher.buckets,
                     time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.perf_counter()
        gc.callbacks.append(metrics.gc_pauses)
        watching = asyncio.ensure_future(watch_loop(metrics.loop_lag))
        try:
            warm = asyncio.ensure_future(batcher.warm_up())
            warm.add_done_callback(lambda _: warmed(started))
            running = asyncio.ensure_future(_after(warm, batcher.run()))
            yield
            batcher.close()
            await running
        finally:
            watching.cancel()
            gc.callbacks.remove(metrics.gc_pauses)
            gc.unfreeze()  # stopping: the frozen objects go as everything else does (no extension reports leaks)
        batcher.executor.shutdown(wait=True)
        if decoder is not None:
            decoder.shutdown(wait=True)
        for process in processes:
            process.close()

    app = FastAPI(title="qandc serve", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        rid = request_id(request)
        log.info("request %s: %d %s", rid, error.status, error.message)
        return JSONResponse({"error": error.message, "request_id": rid}, error.status,
                            {**error.headers, "X-Request-ID": rid})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return await serve_error(request, ServeError(error.status_code, str(error.detail), error.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("request %s failed", request_id(request))
        return await serve_error(request, ServeError(500, f"internal error: {type(error).__name__}"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not all(process.alive for process in processes):
            return JSONResponse({"status": "an engine process exited"}, 503)
        if not batcher.ready or batcher.closing:
            status = batcher.failure or ("shutting down" if batcher.closing else "warming up")
            return JSONResponse({"status": status}, 503)
        return {"status": "ready", "buckets": batcher.buckets}

    @app.get("/metrics")
    async def prometheus():
        metrics.queued_images.set(batcher.queued_images)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate")
    async def generate(request: Request):
        rid = request_id(request)
        try:
            body = await _generate(request, rid)
        except ServeError as e:
            metrics.requests.labels(str(e.status)).inc()
            raise
        metrics.requests.labels("200").inc()
        return JSONResponse(body, headers={"X-Request-ID": rid})

    async def _generate(request: Request, rid: str) -> dict:
        if batcher.failure:
            raise ServeError(503, batcher.failure)
        if not batcher.ready:
            raise ServeError(503, "warming up the engines", {"Retry-After": "1"})
        parsed = parse_request(await read_body(request, options.max_body_bytes), request)
        key, fmt = check_request(parsed, engines, options.max_images, vae is not None)
        ids = parsed.sample_ids if parsed.sample_ids is not None else list(range(len(parsed.labels)))
        job = Job(key, parsed.labels, parsed.seed, ids, rid, asyncio.get_running_loop().create_future())
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ServeError(503, f"the queue is full ({options.max_queue} images)",
                             {"Retry-After": str(e.retry_after)}) from None
        samples, run = await wait_for(job, request, batcher, options.timeout_s)
        metrics.images.inc(len(samples))
        if fmt == "npz":
            payload = await run_in_threadpool(encode_npz, samples, job)
        elif vae is not None:  # on a thread of its own: the next batch samples meanwhile
            payload = await asyncio.get_running_loop().run_in_executor(decoder, decode_to_png, samples,
                                                                       engines.device, vae)
        else:
            payload = await run_in_threadpool(encode_png, model_to_images(samples, engines.config))
        log.info("request %s: %d images, batch of %d (%d padded), queued %.3f s", rid, len(samples), run.images,
                 run.padded, job.batched - job.enqueued)
        return {"request_id": rid, "format": fmt, **payload, "labels": job.labels, "sample_ids": ids,
                "config": {"steps": key.steps, "sampler": key.sampler, "cfg_scale": key.cfg_scale,
                           "seed": parsed.seed, "plan": engines.plan.describe(), "vc": engines.vc is not None,
                           "noise_keying": "per sample: generator keyed by (seed, sample id)"},
                "engines": described,
                "timing": {"queue_seconds": job.batched - job.enqueued, "batch_images": run.images,
                           "batch_padded": run.padded, "sampling_seconds": run.seconds}}

    app.state.batcher, app.state.metrics, app.state.engines = batcher, metrics, processes
    return app


async def _after(warm_up: asyncio.Future, then):
    """Run `then` once the warm-up is done; after a failed one, log it and serve nothing (never ready)."""
    try:
        await warm_up
    except Exception:
        log.exception("the warm-up failed; /readyz stays 503")
        then.close()
        return
    await then


def engine_metadata(engines: EngineProcess, engine_dir: str | Path) -> dict:
    """What every response names the engines by: the manifest's sha256 (its id), backend and precision."""
    manifest = engines.manifest
    return {"manifest_sha256": sha256_file(Path(engine_dir) / "manifest.json"), "backend": manifest.backend,
            "precision": (manifest.recipe or {}).get("preset", "float")}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the rest."""
    if "application/json" not in request.headers.get("content-type", ""):
        raise ServeError(415, "send the request as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServeError(413, f"the body exceeds the limit of {limit} bytes")
    return bytes(body)


def parse_request(body: bytes, request: Request) -> GenerateRequest:
    """The body as a GenerateRequest: malformed JSON is 400, a field of the wrong type, range or name 422."""
    try:
        return GenerateRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ServeError(400, f"the body is not valid JSON ({first['msg']})") from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ServeError(422, f"{where}: {first['msg']}" + (f" (and {len(e.errors()) - 1} more)"
                                                             if len(e.errors()) > 1 else "")) from None


def check_request(req: GenerateRequest, engines: EngineProcess, max_images: int, vae: bool
                  ) -> tuple[BatchKey, str]:
    """The request's batch key and format, each value checked against the engines (422 naming the field)."""
    config, defaults = engines.config, engines.sampler_defaults
    if len(req.labels) > max_images:
        raise ServeError(422, f"labels: {len(req.labels)} images; a request takes at most {max_images}")
    try:
        check_labels(req.labels, config.num_classes)
    except QandcError as e:
        raise ServeError(422, f"labels: {e}") from None
    if req.sample_ids is not None and len(req.sample_ids) != len(req.labels):
        raise ServeError(422, f"sample_ids: {len(req.sample_ids)} ids for {len(req.labels)} labels")
    key = BatchKey(defaults.steps if req.steps is None else req.steps, req.sampler or defaults.sampler,
                   float(defaults.cfg_scale if req.cfg_scale is None else req.cfg_scale))
    try:
        space_timesteps(TRAIN_STEPS, key.steps)
        engines.plan.step_graphs(key.steps)
        vc_correction(engines.vc, key.steps, "the engines", config.in_channels)
    except QandcError as e:
        raise ServeError(422, f"steps: {e}") from None
    images = vae or has_image_space(config)
    fmt = req.format or ("png" if images else "npz")
    if fmt == "png" and not images:
        raise ServeError(422, f"format: png needs images; this model's {config.in_channels}-channel latents come "
                              "as npz (the server was started without --vae)")
    return key, fmt


async def wait_for(job: Job, request: Request, batcher: Batcher, timeout: float):
    """The job's result; a timeout (504) or a client that left takes it out of the queue."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not job.future.done():
        batcher.withdraw(job)
        job.future.cancel()
        if watcher.done() and not watcher.cancelled():
            raise ServeError(499, "the client closed the connection")
        raise ServeError(504, f"no result within {timeout:g} s")
    try:
        return job.future.result()
    except QandcError as e:
        raise ServeError(500, str(e)) from None


def device_thread(name: str, device: torch.device) -> ThreadPoolExecutor:
    """One worker thread that works on `device` (a new thread would take CUDA device 0; "cuda" without an index is
    this thread's current device)."""
    if device.type != "cuda":
        return ThreadPoolExecutor(1, thread_name_prefix=name)
    index = torch.cuda.current_device() if device.index is None else device.index
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=lambda: torch.cuda.set_device(index))


def decode_to_png(latents: torch.Tensor, device: torch.device, vae) -> dict:
    """Latents decoded by `vae` on `device` (the engines'), as encode_png gives them."""
    return encode_png(decode_latents(latents.to(device), vae).cpu())


def encode_png(images: torch.Tensor) -> dict:
    """{"images": [base64 PNG per image]}."""
    pngs = []
    for image in to_uint8(images):
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode())
    return {"images": pngs}


def encode_npz(samples: torch.Tensor, job: Job) -> dict:
    """{"npz": base64 of an .npz with the samples (model space, float32), labels and sample ids}."""
    buffer = io.BytesIO()
    np.savez(buffer, samples=samples.numpy().astype(np.float32), labels=np.array(job.labels),
             sample_ids=np.array(job.sample_ids))
    return {"npz": base64.b64encode(buffer.getvalue()).decode()}


def serve(engine_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions = ServeOptions(),
          nan_fallback: bool = False, vae: str | Path | None = None, device: torch.device | None = None,
          run_graphs: bool = False) -> None:
    """Load the engines (in `options.engine_processes` processes of their own, at once, on `device`) and the VAE
    folder `vae` once and serve them until SIGINT / SIGTERM (which finish the accepted requests first). The address
    is taken first: a port in use or an address not of this machine fails at once, not after the engines load."""
    import uvicorn

    if vae is not None:
        check_vae_folder(vae)  # before the engines load (minutes), as the address
    sock = listening_socket(host, port)
    try:
        app = _loaded_app(engine_dir, options, nan_fallback, vae, device, run_graphs)
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    address, bound = sock.getsockname()[:2]
    log.info("listening on http://%s:%d", f"[{address}]" if ":" in address else address, bound)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=None)).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to the first address `host` resolves to, at `port` (0: any free port); one line when it
    cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        raise QandcError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise QandcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _loaded_app(engine_dir, options: ServeOptions, nan_fallback: bool, vae, device, run_graphs: bool) -> FastAPI:
    """The engine processes, loaded at once, and the service over them."""
    with ThreadPoolExecutor(options.engine_processes) as loading:
        loads = [loading.submit(EngineProcess, engine_dir, nan_fallback, device, run_graphs)
                 for _ in range(options.engine_processes)]
    processes = [load.result() for load in loads if load.exception() is None]
    try:
        if len(processes) < len(loads):
            raise next(load.exception() for load in loads if load.exception() is not None)
        return create_app(processes, engine_dir, options, vae and load_vae(vae, processes[0].device))
    except BaseException:
        for process in processes:
            process.close()
        raise
