"""Starting a worker process from Python (tests, the CLI demo, any Python caller)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

from ferry.errors import WorkerUnavailableError
from ferry.worker.client import WorkerClient

READY_PREFIX = "FERRY_WORKER_PORT="


class WorkerProcess:
    """A running `ferry worker` child process; stop() or use as a context manager."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, workdir: tempfile.TemporaryDirectory):
        self.proc, self.port, self.token = proc, port, token
        self.address = f"127.0.0.1:{port}"
        self._workdir = workdir

    def client(self, **kwargs) -> WorkerClient:
        return WorkerClient(self.address, self.token, **kwargs)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._workdir.cleanup()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_worker(python: str | None = None, stages: Sequence[str] = (), timeout: float = 60.0,
                 env: dict | None = None, max_message_bytes: int | None = None) -> WorkerProcess:
    """Starts `python -m ferry worker` on a free loopback port with a fresh token.

    Waits for the worker's ready line (no polling); if the process exits first, the error
    carries its exit code and the end of its stderr.
    """
    workdir = tempfile.TemporaryDirectory(prefix="ferry-worker-")
    token = secrets.token_hex(32)
    token_file = os.path.join(workdir.name, "token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    cmd = [python or sys.executable, "-m", "ferry", "worker", "--host", "127.0.0.1", "--port", "0",
           "--token-file", token_file, "--port-file", os.path.join(workdir.name, "port"), "--exit-with-parent"]
    if stages:
        cmd += ["--stages", ",".join(stages)]
    if max_message_bytes:
        cmd += ["--max-message-bytes", str(max_message_bytes)]
    stderr_path = os.path.join(workdir.name, "stderr.log")
    stderr = open(stderr_path, "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    stderr.close()
    line_holder: list[str] = []
    reader = threading.Thread(target=lambda: line_holder.append(proc.stdout.readline().decode()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = line_holder[0].strip() if line_holder else ""
    if not line.startswith(READY_PREFIX):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        with open(stderr_path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace")
        workdir.cleanup()
        raise WorkerUnavailableError(
            f"The worker {' '.join(cmd)} did not become ready within {timeout:.0f}s "
            f"(exit code {proc.returncode}); its stderr ends with:\n{tail}")
    return WorkerProcess(proc, int(line[len(READY_PREFIX):]), token, workdir)
