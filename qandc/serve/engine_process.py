"""The engines in a process of their own. A server's sampling loop is host work (a launch or a graph replay a step,
the sampler's arithmetic between steps), and in the server's process it shares one GIL with the HTTP side: every
millisecond the event loop spends on a request is one the sampling loop waits (on an H200, 0.80x of `generate`'s
images/s with both in one process). Here `Pipeline.load` and `Pipeline.generate` run in a spawned process; the
server hands it batches over a pipe (the next may wait there while one runs) and waits on the replies without
holding the GIL."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import QandcError, error_summary

log = logging.getLogger("qandc.serve")


class EngineProcess:
    """`Pipeline.load(engine_dir)` in a process of its own, with the face of the Pipeline the server uses: `config`,
    `plan`, `vc`, `sampler_defaults`, `manifest`, `device` and `max_batch` (the engines' row limit, None without
    one) from the loaded engines; `generate` (samples on the CPU) and its `last_run`, or `submit` and `result` apart
    (batches run in the order submitted, one at a time: a batch submitted while another runs waits in the pipe);
    `close`.
    Loading waits for the engines and raises their load error as the parent's own. `device`: a CUDA device whose
    index the process makes current (engines built on "cuda" load on the current device); `run_graphs`:
    `Pipeline.load`'s."""

    def __init__(self, engine_dir: str | Path, nan_fallback: bool = False, device: torch.device | None = None,
                 run_graphs: bool = False):
        context = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable
        self._pipe, child = context.Pipe()
        index = device.index if device is not None and device.type == "cuda" else None
        self.process = context.Process(target=_run_engines,
                                       args=(child, str(engine_dir), nan_fallback, index, run_graphs),
                                       name="qandc-engines", daemon=True)
        self.process.start()
        child.close()
        loaded = self._reply()
        self.manifest, self.max_batch = loaded["manifest"], loaded["max_batch"]
        self.device = torch.device(loaded["device"])
        self.config, self.plan, self.sampler_defaults = self.manifest.model, self.manifest.plan, self.manifest.sampler
        self.vc = self.manifest.vc_table
        self.last_run: dict | None = None

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def generate(self, labels, seed, steps: int, sampler: str, cfg_scale: float, sample_ids) -> torch.Tensor:
        """`Pipeline.generate(..., allow_nonfinite=True)` of the engines' process (`submit`, then `result`)."""
        self.submit(labels, seed, steps, sampler, cfg_scale, sample_ids)
        return self.result()

    def submit(self, labels, seed, steps: int, sampler: str, cfg_scale: float, sample_ids) -> None:
        """Hand a batch over (`Pipeline.generate`'s arguments, a seed per sample); `result` collects it."""
        try:
            self._pipe.send((list(labels), list(seed), steps, sampler, cfg_scale, list(sample_ids)))
        except (BrokenPipeError, OSError):
            raise self._exited() from None

    def result(self) -> torch.Tensor:
        """The samples (on the CPU) of the oldest batch submitted and not collected yet; `last_run`: the steps
        each graph took and `seconds`, the engines' time on the batch. An error there is a QandcError here (its
        traceback in this log)."""
        samples, self.last_run = self._reply()
        return torch.from_numpy(samples)

    def close(self) -> None:
        """Let the process finish (it exits at the pipe's end) and wait for it."""
        if self.process.is_alive():
            try:
                self._pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._pipe.close()

    def _reply(self):
        try:
            kind, value = self._pipe.recv()
        except (EOFError, OSError):
            raise self._exited() from None
        if kind == "error":
            raise QandcError(value)
        return value

    def _exited(self) -> QandcError:
        self.process.join(5)
        return QandcError(f"the engine process exited (status {self.process.exitcode})")


def _run_engines(pipe, engine_dir: str, nan_fallback: bool, device_index: int | None, run_graphs: bool) -> None:
    """The engine process: load, report, then run each batch the pipe brings until it brings None or closes.
    SIGINT / SIGTERM are the server's to handle: the process finishes the batches it is given. A batch is launched,
    then its samples are copied out; with whole-run graphs a next batch already waiting in the pipe is launched in
    between, so its host work (its generators and noise, drawn on the CPU) runs while the GPU replays the one
    before. The objects alive after loading, and after a batch that compiled, leave the garbage collector's
    generations (`gc.freeze`): a full collection, which stops the launches, then walks only what batches allocate."""
    from ..runtime import Pipeline

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if device_index is not None:
            torch.cuda.set_device(device_index)
        pipeline = Pipeline.load(engine_dir, fallback=nan_fallback, run_graphs=run_graphs)
    except Exception as e:
        pipe.send(("error", one_line(e)))
        return
    gc.freeze()
    pipe.send(("loaded", {"manifest": pipeline.manifest, "max_batch": pipeline.denoiser.max_batch,
                          "device": str(pipeline.device)}))
    pending, free_since = None, time.perf_counter()  # a batch launched, not collected; when the last was collected
    while True:
        if pending is not None and not (run_graphs and pipe.poll()):
            pipe.send(pending.collect(free_since))
            pending, free_since = None, time.perf_counter()
        try:
            batch = pipe.recv()
        except EOFError:
            batch = None
        launched = LaunchedBatch(pipeline, batch) if batch is not None else None
        if launched is not None and any(launched.run.get("compiles", {}).values()):
            gc.freeze()  # the compiled engines' objects
        if pending is not None:
            pipe.send(pending.collect(free_since))
            free_since = time.perf_counter()
        if launched is None:
            gc.unfreeze()  # exiting: the frozen objects go as everything else does (no extension reports leaks)
            return
        pending = launched


class LaunchedBatch:
    """One batch's `Pipeline.generate`, its samples not yet copied to the host (a whole-run graph's replay may
    still be running); `collect` copies them and gives the reply, with the batch's timing: `seconds`, the
    engines' time on it from its launch or the previous batch's end, whichever is later (so the batches' seconds
    add up to the time the engines were busy); `host_seconds` and `cpu_seconds`, the wall and the process's CPU
    time of its launch (noise, launches, replays queued); `wait_seconds`, the time its copy to the host waited for
    the device (near 0: the host is the limit); `compiles`, Inductor's compilations during its launch by how its
    FX graph cache answered (hit, miss, bypass: what a warm-up batch spent its time on)."""

    def __init__(self, pipeline, batch):
        from torch._dynamo.utils import counters  # the engine process's (the server's need not import dynamo)

        from ..engines.inductor_backend import fx_graph_cache_answers

        labels, seeds, steps, sampler, cfg_scale, sample_ids = batch
        self.started, cpu = time.perf_counter(), time.process_time()
        self.samples, self.error, self.run = None, None, {}
        compiles = dict(counters["inductor"])
        try:
            self.samples = pipeline.generate(labels, seeds, steps, sampler, cfg_scale, sample_ids=sample_ids,
                                             allow_nonfinite=True)
            self.run = {**pipeline.last_run, "compiles": fx_graph_cache_answers(compiles)}
        except Exception as e:
            log.exception("a batch of %d images failed", len(labels))
            self.error = one_line(e)
        self.launched, self.cpu_seconds = time.perf_counter(), time.process_time() - cpu

    def collect(self, free_since: float) -> tuple:
        if self.error is not None:
            return "error", self.error
        waiting = time.perf_counter()
        try:
            samples = self.samples.cpu().numpy().astype(np.float32, copy=False)
        except Exception as e:
            log.exception("a batch of %d images failed", len(self.samples))
            return "error", one_line(e)
        done = time.perf_counter()
        return "done", (samples, {**self.run, "seconds": done - max(self.started, free_since),
                                  "host_seconds": self.launched - self.started, "cpu_seconds": self.cpu_seconds,
                                  "wait_seconds": done - waiting})


def one_line(error: Exception) -> str:
    """What a request learns of an engine error: a QandcError's message, or the type and first line of another."""
    if isinstance(error, QandcError):
        return (str(error).splitlines() or [""])[0]
    return f"the engines failed: {error_summary(error)}"
