"""A real ``prefix-serve serve`` process on a free port, for end-to-end tests over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testing.ports import free_port
from testing.server_process import ServerProcess

__all__ = ["free_port", "live_server"]


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
