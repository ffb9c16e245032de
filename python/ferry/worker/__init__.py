"""The gRPC worker that serves every registered stage, and its Python client."""
from ferry.worker.client import WorkerClient
from ferry.worker.launch import WorkerProcess, start_worker
from ferry.worker.server import create_server

__all__ = ["WorkerClient", "WorkerProcess", "create_server", "start_worker"]
