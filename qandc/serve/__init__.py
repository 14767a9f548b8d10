"""`qandc serve`: the engines behind an HTTP endpoint (FastAPI + uvicorn) with dynamic batching: `EngineProcess`
loads an engine folder in a process of its own, `create_app` builds the service over it, `serve` does both and runs
it until SIGINT / SIGTERM."""

from .app import GenerateRequest, ServeOptions, create_app, serve
from .batcher import Batcher, batch_buckets, warm_up_batches
from .engine_process import EngineProcess

__all__ = ["Batcher", "EngineProcess", "GenerateRequest", "ServeOptions", "batch_buckets", "create_app", "serve",
           "warm_up_batches"]
