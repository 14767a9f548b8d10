"""`qandc serve`: the engines behind an HTTP endpoint (FastAPI + uvicorn) with dynamic batching: `create_app` builds
the service over a loaded Pipeline, `serve` loads an engine folder and runs it until SIGINT / SIGTERM."""

from .app import GenerateRequest, ServeOptions, create_app, serve
from .batcher import Batcher, batch_buckets

__all__ = ["Batcher", "GenerateRequest", "ServeOptions", "batch_buckets", "create_app", "serve"]
