"""A real ``prefix-serve serve`` process on a free port, for end-to-end tests over HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from testing.ports import free_port
from testing.server_process import ServerProcess

__all__ = ["free_port", "live_server", "openai_client", "write_keys_file"]


@contextmanager
def live_server(
    model_dir: Path | str, store: Path | str, *, env: dict[str, str] | None = None, timeout: float = 60.0
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
