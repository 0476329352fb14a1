"""Fixtures of the hardening tests: real ``prefix-serve serve`` processes on the demo model with auth
on, run by the same code as the longer scripts in ``hardening`` (here with bounded counts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hardening.common import hardening_server
from testing.server_process import ServerProcess


@dataclass
class Hardened:
    """A running server, its keys ("admin", "user", "none") and its store folder."""

    server: ServerProcess
    keys: dict[str, str | None]
    store: Path

    @property
    def admin_key(self) -> str:
        key = self.keys["admin"]
        assert key is not None
        return key

    def client(self, key: str | None = None) -> httpx.Client:
        """A client with the admin key (or ``key``)."""
        token = key or self.admin_key
        return httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )


@pytest.fixture(scope="session")
def api_server(demo_model_dir: Path) -> Iterator[Hardened]:
    """One server for the API-level tests (fuzzing, hostile uploads, names): small generation limits."""
    with hardening_server(model_dir=demo_model_dir) as (server, keys, store):
        yield Hardened(server, keys, store)
