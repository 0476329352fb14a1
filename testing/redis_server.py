"""A real ``redis-server`` on a free port, started and stopped by the tests (no fakes, no mocks).

Reusable by any test module: ``with running_redis(tmp_dir) as server: server.url``. The server keeps
nothing on disk unless asked (``--save '' --appendonly no``); ``stop(save=True)`` writes a snapshot
first, so ``start()`` on the same port brings the data back, as a restarted production Redis would.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from testing.ports import free_port


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1, with its working folder under ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        for _attempt in range(3):
            log = (self.workdir / "redis.log").open("ab")
            options = {
                "port": str(self.port),
                "bind": "127.0.0.1",
                "save": "",  # keep nothing on disk unless stop(save=True) asks
                "appendonly": "no",
                "dir": str(self.workdir),
                "dbfilename": "dump.rdb",
            }
            command = [
                "redis-server",
                *(arg for name, value in options.items() for arg in (f"--{name}", value)),
            ]
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready(timeout):
                return
            self.kill()
            self.port = free_port()  # someone took the port between choosing and binding it
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def stop(self, *, save: bool = False) -> None:
        """Stop the server (SIGTERM); with ``save``, snapshot first so a restart keeps the data."""
        if self.process is None:
            return
        if save:
            with self.client() as client:
                client.save()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError), self.client() as client:
                if client.ping():
                    return True
            time.sleep(0.02)
        return False


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A started server, stopped (and killed if need be) when the block ends."""
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
