"""A real ``prefix-serve serve`` process on a free port, for end-to-end tests over HTTP, and what those
tests observe of it or hold open in it: its gauges, its aborted requests, an idle engine, long streams."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

from testing.ports import free_port
from testing.server_process import ServerProcess, metric
from testing.waiting import wait_until

__all__ = [
    "HeldStreams",
    "aborted_count",
    "free_port",
    "gauge",
    "live_server",
    "openai_client",
    "wait_idle",
    "write_keys_file",
]


@contextmanager
def live_server(
    model_dir: Path | str, store: Path | str, *, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """Start the server, wait until ``/readyz`` answers 200, yield its base URL, stop it.

    ``store`` is a folder (a filesystem store) or a store URL (``redis://…``).
    """
    store_url = store if isinstance(store, str) else store.resolve().as_uri()
    with ServerProcess(model_dir, store_url, env=env, ready_s=timeout) as server:
        yield server.url


# the --max-new-tokens of the `limited_client` server: below the native default (64), above OpenAI's (16)
NEW_TOKENS_LIMIT = 40


def write_keys_file(path: Path, keys: dict[str, tuple[str, str]], tenants: dict | None = None) -> Path:
    """A keys file at ``path`` for ``keys`` (key -> (tenant, role)), as SHA-256 hashes only."""
    entries = [
        {"tenant": tenant, "role": role, "sha256": hashlib.sha256(key.encode()).hexdigest()}
        for key, (tenant, role) in keys.items()
    ]
    path.write_text(json.dumps({"keys": entries, "tenants": tenants or {}}))
    return path


def openai_client(url: str, key: str) -> openai.OpenAI:
    """The official client of the server at ``url``, as a tool would point it: ``{url}/v1``, no retries."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def gauge(server: ServerProcess, name: str) -> float:
    """The server's unlabelled ``prefix_serve_<name>`` (0 when absent)."""
    return server.gauges().get(f"prefix_serve_{name}", 0.0)


def aborted_count(server: ServerProcess) -> float:
    """Generation requests the server has aborted (a client that left, a shutdown)."""
    return metric(server.url, "prefix_serve_generation_finished_total", reason="aborted")


def wait_idle(server: ServerProcess) -> None:
    """Until no request runs or waits in the server's engine (what an earlier step left has ended)."""
    wait_until(
        lambda: gauge(server, "running_requests") == 0 and gauge(server, "queue_depth") == 0,
        "the engine is idle",
    )


class HeldStreams:
    """Long streamed completions of one caller, each held open (running or queued) until ``close``. They
    ignore end-of-sequence tokens (a prefix can make the demo model write one early): nothing but the
    hang-up ends them while a test holds them."""

    def __init__(
        self, url: str, key: str | None, *, max_tokens: int, prompt: str = "Once upon a time"
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=url, headers=headers, timeout=120)
        self._base_model = self._client.get("/v1/models").json()["data"][0]["id"]
        self._body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        # each response with its line iterator, kept: dropping the iterator would close the connection
        self._open: list[tuple[httpx.Response, Iterator[str]]] = []

    def open(self, task_id: str | None = None) -> None:
        """Start one, on ``task_id`` or the base model; its 200 means the limits admitted it and the
        engine queued it."""
        body = {**self._body, "model": task_id or self._base_model}
        response = self._client.send(
            self._client.build_request("POST", "/v1/completions", json=body), stream=True
        )
        assert response.status_code == 200, response.read()
        self._open.append((response, response.iter_lines()))

    def first_event(self) -> str:
        """The latest stream's first event: its request is running."""
        _, lines = self._open[-1]
        return next(line for line in lines if line.startswith("data: "))

    def close(self) -> None:
        """Hang up on every one (the server aborts them)."""
        for response, _ in self._open:
            response.close()
        self._open.clear()
        self._client.close()
