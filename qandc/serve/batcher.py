"""Dynamic batching: requests with the same sampler settings are merged into one engine batch (up to `max_batch`
images, or whatever arrived within `max_wait_ms` of the oldest), padded to a batch-size bucket warmed at start, and
handed to the engine process (`EngineProcess`) by one batching thread; a second thread collects the results. A full
batch is handed over while another runs (it waits in the pipe), so under load the engines go from batch to batch
without waiting on this process; a partial one waits for idle engines, taking what arrives meanwhile. Each sample
keeps its own noise key (request seed, sample id), so an image does not depend on what it was batched with; a sample
whose output is not finite fails only its own request."""

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
HANDED_OVER = 2  # batches with the engine process at most: one running, a full one waiting in its pipe


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
    recomputed by the float model, real images whose output is not finite."""

    images: int
    padded: int
    steps: int
    seconds: float
    engine_steps: dict
    fallback_steps: int
    nonfinite: int


class QueueFull(Exception):
    """The queue holds `max_queue` images already; `retry_after`: seconds until it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class NonFiniteSamples(QandcError):
    """A request whose samples came out NaN / Inf (the rest of its batch is unaffected)."""


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two below `max_batch`, and `max_batch`."""
    return sorted({2 ** k for k in range(max_batch.bit_length()) if 2 ** k < max_batch} | {max_batch})


class Batcher:
    """Merges submitted jobs into batches and runs them on `engines` (one at a time, in order). `warm_up()` runs a
    batch at every bucket first (compiling and capturing CUDA graphs where the engines do) and sets `ready`; `run()`
    serves until `close()`, then finishes the queued jobs. The queue is shared by the event loop (submit, withdraw)
    and the batching thread (forming batches) under one lock; the collecting thread hands results to the loop."""

    def __init__(self, engines: EngineProcess, max_batch: int, max_wait_ms: float, max_queue: int, on_batch=None):
        self.engines, self.max_batch, self.max_wait, self.max_queue = engines, max_batch, max_wait_ms / 1000, \
            max_queue
        self.buckets = batch_buckets(max_batch)
        self.on_batch = on_batch or (lambda run, jobs: None)
        self.pending: deque[Job] = deque()
        self.queued_images = 0
        self.ready = self.closing = False
        self.failure: str | None = None
        self.batch_seconds = 0.0  # the last batch's, for Retry-After
        self.executor = ThreadPoolExecutor(2, thread_name_prefix="qandc-batches")  # hands over; collects
        self._queue = threading.Condition(threading.RLock())
        self._handed: queue.SimpleQueue = queue.SimpleQueue()  # (jobs, padded size) in the engines' order; None
        self.handed_over = 0  # batches with the engine process

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when its images would take the queue past `max_queue`."""
        with self._queue:
            if self.closing or self.queued_images + len(job.labels) > self.max_queue:
                batches = math.ceil((self.queued_images + 1) / self.max_batch) + self.handed_over
                raise QueueFull(max(1, math.ceil(batches * self.batch_seconds)))
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
        """Run the warm-up batches; a failure is kept in `failure` (the server then never turns ready)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._warm_up)
        except Exception as e:
            self.failure = f"the warm-up failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            raise
        self.ready = True

    def _warm_up(self) -> None:
        """One guided batch at every bucket (guidance doubles the rows), and an unguided one where a bucket's row
        count is no guided batch's, with the engines' steps and sampler: serving meets no new shape."""
        defaults = self.engines.sampler_defaults
        guided = defaults.cfg_scale if defaults.cfg_scale != 1.0 else 2.0  # any scale but 1 doubles the rows
        guided_rows = {2 * b for b in self.buckets}
        for size in self.buckets:
            for scale in (guided, 1.0) if size not in guided_rows else (guided,):
                self.engines.generate([0] * size, [0] * size, defaults.steps, defaults.sampler, scale, range(size))

    async def run(self) -> None:
        """Serve batches until `close()` and the queue is empty: one thread hands them over, one collects."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(loop.run_in_executor(self.executor, self._hand_over, loop),
                             loop.run_in_executor(self.executor, self._collect, loop))

    def close(self) -> None:
        """Stop taking jobs; `run` finishes the queued ones and returns."""
        with self._queue:
            self.closing = True
            self._queue.notify()

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """The batching thread: form each batch and hand it to the engine process."""
        while jobs := self._next_batch(loop):
            try:
                self._handed.put((jobs, self._submit(jobs)))
            except Exception as e:  # the engine process is gone
                self._collected()
                loop.call_soon_threadsafe(self._fail, jobs, e)
        self._handed.put(None)

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        """The collecting thread: each handed-over batch's results, in order, to the event loop."""
        while (handed := self._handed.get()) is not None:
            jobs, size = handed
            try:
                result = self._result(jobs, size)
            except Exception as e:  # the whole batch failed (an engine error): each request gets one line
                log.exception("a batch of %d requests failed", len(jobs))
                loop.call_soon_threadsafe(self._fail, jobs, e)
            else:
                loop.call_soon_threadsafe(self._deliver, jobs, *result)
            finally:
                self._collected()

    def _collected(self) -> None:
        with self._queue:
            self.handed_over -= 1
            self._queue.notify()

    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """The oldest job and the later ones with its settings that fit in `max_batch`: at once when they fill it
        and fewer than HANDED_OVER batches are with the engines; otherwise once the engines are idle and the oldest
        has waited `max_wait` (or the server is closing). [] once closing with nothing queued (or once the loop is
        gone: a server stopped without its shutdown must not leave this thread waiting)."""
        with self._queue:
            while True:
                if not self.pending:
                    if self.closing or loop.is_closed():
                        return []
                    self._queue.wait(1.0)
                    continue
                head = self.pending[0]
                jobs = self._fitting(head)
                remaining = head.enqueued + self.max_wait - time.monotonic()
                full = sum(len(j.labels) for j in jobs) >= self.max_batch
                idle = self.handed_over == 0
                if self.handed_over < HANDED_OVER and (full or idle and (remaining <= 0 or self.closing)):
                    now = time.monotonic()
                    for job in jobs:
                        self.withdraw(job)  # the condition's lock is re-entrant
                        job.batched = now
                    self.handed_over += 1
                    return jobs
                self._queue.wait(remaining if idle and remaining > 0 else 1.0)

    def _fitting(self, head: Job) -> list[Job]:
        jobs, images = [], 0
        for job in self.pending:
            if job.key == head.key and images + len(job.labels) <= self.max_batch:
                jobs.append(job)
                images += len(job.labels)
        return jobs

    def _submit(self, jobs: list[Job]) -> int:
        """Hand `jobs` over as one batch padded to its bucket (padding: label 0, seed 0); the bucket."""
        key = jobs[0].key
        labels = [label for job in jobs for label in job.labels]
        seeds = [job.seed for job in jobs for _ in job.labels]
        ids = [i for job in jobs for i in job.sample_ids]
        size = next(b for b in self.buckets if b >= len(labels))
        pad = size - len(labels)
        self.engines.submit(labels + [0] * pad, seeds + [0] * pad, key.steps, key.sampler, key.cfg_scale,
                            ids + list(range(pad)))
        return size

    def _result(self, jobs: list[Job], size: int) -> tuple[torch.Tensor, torch.Tensor, BatchRun]:
        """A handed-over batch's (samples of `jobs`, which of them are not finite, the run)."""
        images = sum(len(job.labels) for job in jobs)
        samples = self.engines.result()[:images]
        last = self.engines.last_run
        bad = nonfinite_samples(samples)
        return samples, bad, BatchRun(images, size, jobs[0].key.steps, last["seconds"],
                                      {"full": last.get("full", 0), "reuse": last.get("reuse", 0)},
                                      len(last.get("fallback_steps", ())), int(bad.sum()))

    def _deliver(self, jobs: list[Job], samples: torch.Tensor, bad: torch.Tensor, run: BatchRun) -> None:
        """On the event loop: each request its samples, or the error of its non-finite ones."""
        self.batch_seconds = run.seconds
        self.on_batch(run, jobs)
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
