"""Dynamic batching: requests with the same sampler settings are merged into one engine batch (up to `max_batch`
images, or whatever arrived within `max_wait_ms` of the oldest), padded to a batch-size bucket warmed at start, and
handed to an engine process (`EngineProcess`; one, or several on one device: see `ServeOptions`) by one
batching thread; a thread a process collects its results. A full batch is handed over while another runs (it waits
in the pipe), so under load the engines go from batch to batch without waiting on this process; a partial one waits
for idle engines, taking what arrives meanwhile. Each sample keeps its own noise key (request seed, sample id), so an
image does not depend on what it was batched with; a sample whose output is not finite fails only its own request."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import QandcError
from ..runtime.pipeline import nonfinite_samples
from .engine_process import EngineProcess, one_line

log = logging.getLogger("qandc.serve")
HANDED_OVER = 2  # batches with an engine process at most: one running, a full one waiting in its pipe


@dataclass(frozen=True)
class BatchKey:
    """The settings a batch shares: requests with equal keys can be merged."""

    steps: int
    sampler: str
    cfg_scale: float


@dataclass
class Job:
    """One request's samples, waiting for (or in) a batch; `future` gets (its samples (n, C, H, W) on the CPU, the
    BatchRun they came from)."""

    key: BatchKey
    labels: list[int]
    seed: int
    sample_ids: list[int]
    request_id: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    batched: float | None = None  # when its batch was handed to the engines


@dataclass(frozen=True)
class BatchRun:
    """What one engine batch did, for the metrics: real and padded images, seconds, steps by graph kind, steps
    recomputed by the float model, real images whose output is not finite, and where its seconds went (the engine
    process's `host_seconds`, `cpu_seconds` and `wait_seconds`: `engine_process.LaunchedBatch`)."""

    images: int
    padded: int
    steps: int
    seconds: float
    engine_steps: dict
    fallback_steps: int
    nonfinite: int
    host_seconds: float
    cpu_seconds: float
    wait_seconds: float


class QueueFull(Exception):
    """The queue holds `max_queue` images already; `retry_after`: seconds until it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class NonFiniteSamples(QandcError):
    """A request whose samples came out NaN / Inf (the rest of its batch is unaffected)."""


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two and, from 12 on, the midpoints between them (12, 24, 48, 96, ...), below
    `max_batch`; and `max_batch`. Beyond 8 images, where a batch's time grows with its size, padding adds less than
    half (powers of two alone: up to nearly as much again — 17 images ran as 32, and the requests that arrived during
    that longer batch filled the next past 16 again: at half load on an H200 the mean batch was 17.5 images and p99
    latency 2.3x p50, session 16)."""
    ladder = {2 ** k for k in range(max_batch.bit_length())} | {3 * 2 ** k for k in range(2, max_batch.bit_length())}
    return sorted({b for b in ladder if b < max_batch} | {max_batch})


def warm_up_batches(buckets: list[int]) -> list[tuple[int, bool]]:
    """(images, guided) of the warm-up's batches: every bucket guided (guidance doubles the rows), and unguided where
    a bucket's row count is no guided batch's: serving meets no new shape."""
    guided_rows = {2 * b for b in buckets}
    return [(size, guided) for size in buckets for guided in ((True, False) if size not in guided_rows else (True,))]


class Batcher:
    """Merges submitted jobs into batches and runs them on the engine processes `engines` (each one batch at a time,
    in the order handed over; a batch goes to an idle process first, else to the least busy). `warm_up()` runs a
    batch at every bucket on each first (compiling and capturing CUDA graphs where the engines do) and sets `ready`;
    `run()` serves until `close()`, then finishes the queued jobs. The queue is shared by the event loop (submit,
    withdraw) and the batching thread (forming batches) under one lock; the collecting threads hand results to the
    loop."""

    def __init__(self, engines: list[EngineProcess], max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch=None):
        self.engines, self.max_batch, self.max_wait, self.max_queue = engines, max_batch, max_wait_ms / 1000, \
            max_queue
        self.buckets = batch_buckets(max_batch)
        self.on_batch = on_batch or (lambda run, jobs: None)
        self.pending: deque[Job] = deque()
        self.queued_images = 0
        self.ready = self.closing = False
        self.failure: str | None = None
        self.batch_seconds = 0.0  # the last batch's, for Retry-After
        # one thread hands batches over, one a process collects
        self.executor = ThreadPoolExecutor(1 + len(engines), thread_name_prefix="qandc-batches")
        self._queue = threading.Condition(threading.RLock())
        # a process's (jobs, padded size) in the order handed over; None: no more
        self._handed: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in engines]
        self.handed = [0] * len(engines)  # batches with each process

    @property
    def handed_over(self) -> int:
        """Batches with the engine processes."""
        return sum(self.handed)

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when its images would take the queue past `max_queue`."""
        with self._queue:
            if self.closing or self.queued_images + len(job.labels) > self.max_queue:
                batches = math.ceil((self.queued_images + 1) / self.max_batch) + self.handed_over
                raise QueueFull(max(1, math.ceil(batches * self.batch_seconds / len(self.engines))))
            self.pending.append(job)
            self.queued_images += len(job.labels)
            self._queue.notify()

    def withdraw(self, job: Job) -> None:
        """Take a job that is still queued out (its client timed out or left): its images free their slots."""
        with self._queue:
            if job in self.pending:
                self.pending.remove(job)
                self.queued_images -= len(job.labels)

    async def warm_up(self) -> None:
        """Run the warm-up batches; a failure is kept in `failure` (the server then never turns ready). `close()`
        during the warm-up stops it after the batch that runs (a SIGTERM then does not wait for every bucket)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._warm_up)
        except Exception as e:
            self.failure = f"the warm-up failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            raise
        self.ready = not self.closing

    def _warm_up(self) -> None:
        """The `warm_up_batches` with the engines' steps and sampler, on every process at once; each one's seconds
        and Inductor compilations logged (where a warm-up's time goes)."""
        defaults = self.engines[0].sampler_defaults
        guided_scale = defaults.cfg_scale if defaults.cfg_scale != 1.0 else 2.0  # any scale but 1 doubles the rows
        for size, guided in warm_up_batches(self.buckets):
            if self.closing:
                log.info("warm-up stopped: shutting down")
                return
            started = time.monotonic()
            for process in self.engines:
                process.submit([0] * size, [0] * size, defaults.steps, defaults.sampler,
                               guided_scale if guided else 1.0, range(size))
            for process in self.engines:
                process.result()
            compiles = self.engines[0].last_run["compiles"]
            log.info("warm-up: a batch of %d images, %s, in %.1f s (Inductor compilations by its cache: %d hit, "
                     "%d missed, %d bypassed)", size, "guided" if guided else "unguided", time.monotonic() - started,
                     compiles["hit"], compiles["miss"], compiles["bypass"])

    async def run(self) -> None:
        """Serve batches until `close()` and the queue is empty: one thread hands them over, one a process
        collects."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(loop.run_in_executor(self.executor, self._hand_over, loop),
                             *(loop.run_in_executor(self.executor, self._collect, loop, i)
                               for i in range(len(self.engines))))

    def close(self) -> None:
        """Stop taking jobs; `run` finishes the queued ones and returns."""
        with self._queue:
            self.closing = True
            self._queue.notify()

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """The batching thread: form each batch and hand it to an engine process."""
        while batch := self._next_batch(loop):
            jobs, process = batch
            try:
                self._handed[process].put((jobs, self._submit(jobs, process)))
            except Exception as e:  # the engine process is gone
                self._collected(process)
                loop.call_soon_threadsafe(self._fail, jobs, e)
        for handed in self._handed:
            handed.put(None)

    def _collect(self, loop: asyncio.AbstractEventLoop, process: int) -> None:
        """A collecting thread: each batch handed to engine process `process`, its results in order to the event
        loop."""
        while (handed := self._handed[process].get()) is not None:
            jobs, size = handed
            try:
                result = self._result(jobs, size, process)
            except Exception as e:  # the whole batch failed (an engine error): each request gets one line
                log.exception("a batch of %d requests failed", len(jobs))
                loop.call_soon_threadsafe(self._fail, jobs, e)
            else:
                loop.call_soon_threadsafe(self._deliver, jobs, *result)
            finally:
                self._collected(process)

    def _collected(self, process: int) -> None:
        with self._queue:
            self.handed[process] -= 1
            self._queue.notify()

    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> tuple[list[Job], int] | None:
        """(The oldest job and the later ones with its settings that fit in `max_batch`, the engine process to take
        them): at once when they fill it and a process has fewer than HANDED_OVER batches; otherwise once a process
        is idle and the oldest has waited `max_wait` (or the server is closing). None once closing with nothing
        queued (or once the loop is gone: a server stopped without its shutdown must not leave this thread
        waiting)."""
        with self._queue:
            while True:
                if not self.pending:
                    if self.closing or loop.is_closed():
                        return None
                    self._queue.wait(1.0)
                    continue
                head = self.pending[0]
                jobs = self._fitting(head)
                remaining = head.enqueued + self.max_wait - time.monotonic()
                full = sum(len(j.labels) for j in jobs) >= self.max_batch
                process = min(range(len(self.engines)), key=self.handed.__getitem__)  # the least busy
                idle = self.handed[process] == 0
                if self.handed[process] < HANDED_OVER and (full or idle and (remaining <= 0 or self.closing)):
                    now = time.monotonic()
                    for job in jobs:
                        self.withdraw(job)  # the condition's lock is re-entrant
                        job.batched = now
                    self.handed[process] += 1
                    return jobs, process
                self._queue.wait(remaining if idle and remaining > 0 else 1.0)

    def _fitting(self, head: Job) -> list[Job]:
        jobs, images = [], 0
        for job in self.pending:
            if job.key == head.key and images + len(job.labels) <= self.max_batch:
                jobs.append(job)
                images += len(job.labels)
        return jobs

    def _submit(self, jobs: list[Job], process: int) -> int:
        """Hand `jobs` to engine process `process` as one batch padded to its bucket (padding: label 0, seed 0); the
        bucket."""
        key = jobs[0].key
        labels = [label for job in jobs for label in job.labels]
        seeds = [job.seed for job in jobs for _ in job.labels]
        ids = [i for job in jobs for i in job.sample_ids]
        size = next(b for b in self.buckets if b >= len(labels))
        pad = size - len(labels)
        self.engines[process].submit(labels + [0] * pad, seeds + [0] * pad, key.steps, key.sampler, key.cfg_scale,
                                     ids + list(range(pad)))
        return size

    def _result(self, jobs: list[Job], size: int, process: int) -> tuple[torch.Tensor, torch.Tensor, BatchRun]:
        """A batch handed to engine process `process`: (samples of `jobs`, which of them are not finite, the
        run)."""
        images = sum(len(job.labels) for job in jobs)
        samples = self.engines[process].result()[:images]
        last = self.engines[process].last_run
        bad = nonfinite_samples(samples)
        return samples, bad, BatchRun(images, size, jobs[0].key.steps, last["seconds"],
                                      {"full": last.get("full", 0), "reuse": last.get("reuse", 0)},
                                      len(last.get("fallback_steps", ())), int(bad.sum()), last["host_seconds"],
                                      last["cpu_seconds"], last["wait_seconds"])

    def _deliver(self, jobs: list[Job], samples: torch.Tensor, bad: torch.Tensor, run: BatchRun) -> None:
        """On the event loop: each request its samples, or the error of its non-finite ones."""
        self.batch_seconds = run.seconds
        self.on_batch(run, jobs)
        if run.nonfinite:  # which rows of which bucket: where a fault of the engines shows its pattern
            log.warning("a batch of %d images (bucket %d, %d steps) came out not finite in rows %s", run.images,
                        run.padded, run.steps, bad.nonzero().flatten().tolist())
        start = 0
        for job in jobs:
            part, part_bad = samples[start:start + len(job.labels)], bad[start:start + len(job.labels)]
            start += len(job.labels)
            if job.future.done():  # timed out or cancelled while running
                continue
            if part_bad.any():
                ids = [i for i, b in zip(job.sample_ids, part_bad.tolist()) if b]
                job.future.set_exception(NonFiniteSamples(
                    f"the engines' output is not finite (NaN / Inf) for sample ids {ids}"))
            else:
                job.future.set_result((part, run))

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        """On the event loop: every request of a failed batch gets the error's first line."""
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(QandcError(one_line(error)))
