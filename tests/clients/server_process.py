"""A ``prefix-serve serve`` process started without waiting, so that several start at once, and with
any store URL (``tests/server/api/live_server.py`` waits for each and takes a store folder)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server.api.live_server import free_port


class ServerProcess:
    """A server on a free port, its output in a temporary file (shown if it fails to start)."""

    def __init__(self, model_dir: Path, store_url: str, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir)]
        command += ["--store", store_url, "--port", str(port), "--device", "cpu"]
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives until stop())
        self._process = subprocess.Popen(
            command,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_until_answering(self, path: str, timeout: float = 90.0) -> None:
        """Wait until ``GET path`` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                raise RuntimeError(f"the server did not start:\n{self._log.read()[-5000:]}")
            time.sleep(0.1)

    def terminate(self) -> None:
        """Ask the server to stop (``stop`` waits for it); stopping several at once saves seconds."""
        self._process.terminate()

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
