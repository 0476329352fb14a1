"""A real ``prefix-serve serve`` process on a free port, for end-to-end tests over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(
    model_dir: Path, store: Path | str, *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """Start the server, wait until ``/readyz`` answers 200, yield its base URL, stop it.

    ``store`` is a folder (a filesystem store) or a store URL (``redis://…``).
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        str(model_dir),
        "--store",
        store if isinstance(store, str) else store.resolve().as_uri(),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    # the log goes to a file, not a pipe: a chatty server never blocks on a full pipe
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_until_ready(process, url, log, timeout)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen, url: str, log: IO[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited early:\n{log.read()[-5000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not become ready")
        time.sleep(0.2)
