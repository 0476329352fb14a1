"""A server shared by the API modules that need configured generation limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.api.live_server import NEW_TOKENS_LIMIT, live_server


@pytest.fixture(scope="session")
def limited_client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client of a live server (auth off) whose ``max_new_tokens`` limit is ``NEW_TOKENS_LIMIT``."""
    env = {"PREFIX_SERVE_MAX_NEW_TOKENS": str(NEW_TOKENS_LIMIT)}
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store"), env=env) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client
