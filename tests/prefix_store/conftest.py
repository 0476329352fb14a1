"""Fixtures of the storage and registry tests: a real ``redis-server`` (session-wide, flushed per test),
stores of both backends, and small valid native prefixes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.redis_store import RedisStore
from prefix_store.storage.store import PrefixStore
from testing.redis_server import RedisServer
from testing.waiting import PATIENCE_S, wait_until

GEOMETRY = ModelGeometry(model_type="llama", num_layers=2, num_kv_heads=2, head_dim=4)
NUM_VIRTUAL_TOKENS = 4
PREFIX_BYTES = NUM_VIRTUAL_TOKENS * GEOMETRY.bytes_per_virtual_token(4)  # float32 on the device


@functools.cache
def make_blob(
    seed: int, num_virtual_tokens: int = NUM_VIRTUAL_TOKENS, geometry: ModelGeometry = GEOMETRY
) -> bytes:
    """A valid native prefix whose values depend on ``seed``, byte for byte the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    shape = geometry.prefix_shape(num_virtual_tokens)
    return encode_native(
        Prefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)), geometry
    )


def put(store: PrefixStore, tenant: str, task_id: str, blob: bytes, **kwargs: object):
    return store.put(
        tenant, task_id, blob, num_virtual_tokens=NUM_VIRTUAL_TOKENS, source_format="native", **kwargs
    )


def wait_for(
    condition: Callable[[], object],
    timeout: float = PATIENCE_S,
    interval: float = 0.01,
    what: str = "the condition holds",
) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` (a bound for a loaded machine, not a
    speed to check) saying ``what`` was awaited."""
    wait_until(condition, what, timeout_s=timeout, interval_s=interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.e2e)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_factory(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., PrefixStore]]:
    """Opens stores of the test's backend over one shared location (folder or Redis database)."""
    opened: list[PrefixStore] = []
    url = request.getfixturevalue("redis_url") if backend == "redis" else None

    def factory(**options: object) -> PrefixStore:
        if url is not None:
            store: PrefixStore = RedisStore(url, **options)  # type: ignore[arg-type]
        else:
            store = FileStore(tmp_path / "store", **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: Callable[..., PrefixStore]) -> PrefixStore:
    return store_factory()
