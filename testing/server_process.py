"""A real ``prefix-serve serve`` process on a free port, the one every test and script starts: it can
be launched without waiting, measured (RSS), killed with SIGKILL and restarted on the same store, and
its ``/metrics`` gauges read (``metric`` reads one sample of any server by its URL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
from prometheus_client.parser import text_string_to_metric_families

from testing.ports import free_port

_GAUGE = re.compile(r"^(prefix_serve_[a-z_]+) ([0-9.eE+-]+)$", re.MULTILINE)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of ``GET {url}/metrics``: ``name`` as exported (``prefix_serve_…_total``) with exactly
    ``labels``; 0 when the server has not exported it yet (a counter no event has touched)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


class ServerProcess:
    """``with ServerProcess(model, store_url) as server: server.url``: ``model`` is what ``--model`` takes
    (a folder, a built-in name, a ``.gguf`` file). ``env`` holds extra
    ``PREFIX_SERVE_*`` settings, ``args`` extra ``serve`` options, ``cwd`` where it runs. The log goes to ``log_path`` or a temporary file (``log_tail()``),
    never a pipe."""

    def __init__(
        self,
        model_dir: Path | str,
        store_url: str,
        *,
        env: dict[str, str] | None = None,
        ready_s: float = 180.0,  # a bound for a loaded machine: a server that exits fails at once
        log_path: Path | None = None,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
        self.model_dir, self.store_url, self.ready_s = model_dir, store_url, ready_s
        self.args, self.cwd = args, cwd
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None
        # closed by close(); a temporary file unless the caller keeps the log
        self._log = log_path.open("w+") if log_path else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ready_path: str = "/readyz") -> None:
        """Start on this object's port and wait until ``GET ready_path`` answers 200."""
        self.launch()
        self.wait_until_answering(ready_path)

    def launch(self) -> None:
        """Start the process without waiting (several servers can then load their models at once)."""
        command = [sys.executable, "-m", "server.cli", "serve", "--model", str(self.model_dir)]
        command += ["--store", self.store_url, "--port", str(self.port), "--device", "cpu", *self.args]
        self.process = subprocess.Popen(
            command, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, text=True
        )

    def wait_until_answering(self, path: str = "/readyz") -> None:
        """Wait until ``GET path`` answers 200; raise with the log's tail if the server exits or is late."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + self.ready_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer {path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def terminate(self) -> None:
        """Ask the server to stop without waiting (``stop`` waits); stopping several at once saves seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()

    def rss_bytes(self) -> int:
        """The server process's resident set size, from ``/proc``."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/<pid>/status")

    def gauges(self) -> dict[str, float]:
        """The unlabelled ``prefix_serve_*`` samples of ``GET /metrics``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {name: float(value) for name, value in _GAUGE.findall(text)}

    def counter(self, name: str, **labels: str) -> float:
        """One labelled sample of ``GET /metrics`` (0 when absent)."""
        return metric(self.url, name, **labels)

    def log_tail(self, chars: int = 5000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and drop its log."""
        self.stop()
        self._log.close()
