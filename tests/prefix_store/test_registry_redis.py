"""The registry over a real Redis: replicas in two processes converge on uploads through the change feed
alone (no periodic reconcile), and still after their pub/sub connection is killed; a Redis outage leaves
resident prefixes serving, fails cold loads within the client's timeouts, and heals by itself when Redis
returns."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prefix_store.cache.registry import PrefixRegistry
from prefix_store.errors import PrefixNotFound, StoreUnavailable
from prefix_store.formats.limits import PrefixLimits
from prefix_store.storage.redis_store import RedisStore
from testing.redis_server import RedisServer
from tests.prefix_store.conftest import GEOMETRY, make_blob, put, wait_for

pytestmark = pytest.mark.e2e  # starts servers or other processes

ROOT = Path(__file__).resolve().parents[2]
# a call during an outage is bounded by the client's timeouts and retries (about a second here); this is
# the bound on "it returns at all", generous enough for a loaded machine
NOT_HUNG_S = 20.0


class Replica:
    """The other replica: ``registry_process`` in its own Python process, without a periodic reconcile:
    what it learns, it learns from the change feed (and the reconcile each (re)subscription runs)."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.prefix_store.registry_process", url, "none"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read() == {"ready": True}

    def ask(self, *command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def resident(self, task_id: str) -> str | None:
        return self.ask("resident", "t", task_id)["version"]

    def _read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the replica died"
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(AssertionError, BrokenPipeError, ValueError):
            self.ask("quit")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def replica(redis_url: str) -> Iterator[Replica]:
    other = Replica(redis_url)
    yield other
    other.close()


def test_an_upload_on_one_replica_reaches_another_through_the_feed(
    redis_url: str, redis_server: RedisServer, replica: Replica
) -> None:
    with RedisStore(redis_url) as store, redis_server.client() as admin:
        first, _ = put(store, "t", "task", make_blob(1))
        assert replica.ask("acquire", "t", "task") == {"version": first.version}
        wait_for(
            lambda: admin.pubsub_numsub("prefix-serve:changes")[0][1] >= 1, what="the replica subscribes"
        )

        second, _ = put(store, "t", "task", make_blob(2))
        assert replica.ask("acquire", "t", "task") == {"version": second.version}  # at once: version check
        third, _ = put(store, "t", "task", make_blob(3))
        # no periodic reconcile and nobody asks: the feed told it, and it loaded the new version
        wait_for(lambda: replica.resident("task") == third.version, what="the feed brings the third version")

        # pub/sub loses what is published while the subscriber is away; the replica still converges
        assert admin.client_kill_filter(_type="pubsub") >= 1
        fourth, _ = put(store, "t", "task", make_blob(4))
        wait_for(  # the reconcile that the resubscription runs
            lambda: replica.resident("task") == fourth.version, what="the resubscribed replica catches up"
        )

        store.delete("t", "task")
        wait_for(lambda: replica.resident("task") is None, what="the feed brings the delete")
        assert replica.ask("acquire", "t", "task") == {"error": PrefixNotFound.__name__}
        stats = replica.ask("stats")
        assert stats["prefetches"] >= 1 and stats["resident_count"] == 0


def test_redis_outage_resident_prefixes_serve_cold_loads_fail_fast_and_it_heals(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisStore(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        registry = PrefixRegistry(
            store,
            GEOMETRY,
            device="cpu",
            dtype=torch.float32,
            limits=PrefixLimits(),
            reconcile_interval_s=0.2,
            store_retry_s=0.3,
        )
        with registry, store:
            warm, _ = put(store, "t", "warm", make_blob(1))
            put(store, "t", "cold", make_blob(2))
            registry.release(registry.acquire("t", "warm"))

            server.stop(save=True)
            for _ in range(3):
                started = time.monotonic()
                with registry.pinned("t", "warm") as handle:  # resident: still served
                    assert handle.record == warm
                assert time.monotonic() - started < NOT_HUNG_S
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                registry.acquire("t", "cold")  # not resident: fails, bounded by the client's timeouts
            assert time.monotonic() - started < NOT_HUNG_S
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                put(store, "t", "cold", make_blob(3))  # writes fail too (503), bounded by timeouts
            assert time.monotonic() - started < NOT_HUNG_S
            stats = registry.stats()
            assert not stats.store_available and stats.served_during_outage >= 1

            server.start()  # same port, same data; nothing is rebuilt
            wait_for(lambda: _loads(registry, "cold"), interval=0.05, what="a cold load succeeds again")
            assert registry.stats().store_available
            with RedisStore(server.url) as other_replica:  # the feed reconnected too
                newer, _ = put(other_replica, "t", "warm", make_blob(4))
            wait_for(
                lambda: registry.resident_version("t", "warm") == newer.version,
                what="the registry hears of the newer version",
            )
    finally:
        server.kill()


def _loads(registry: PrefixRegistry, task_id: str) -> bool:
    try:
        registry.release(registry.acquire("t", task_id))
    except StoreUnavailable:
        return False
    return True
