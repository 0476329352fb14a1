"""What only the Redis store has: URL options (auth, TLS, namespace), errors translated at the edge,
replay-safe writes, blob TTLs, and a change feed that survives a killed connection."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest
import redis

from prefix_store.errors import InvalidName, StoreUnavailable
from prefix_store.storage.redis_store import RedisStore
from prefix_store.storage.store import open_store
from testing.ports import free_port
from testing.redis_server import RedisServer
from tests.prefix_store.conftest import make_blob, put, wait_for

pytestmark = pytest.mark.e2e  # starts servers or other processes


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url, gc_grace_s=60) as opened:
        yield opened


def test_url_options_password_and_namespace(redis_url: str, redis_server: RedisServer) -> None:
    with redis_server.client() as admin:
        admin.acl_setuser(
            "writer", enabled=True, passwords=["+s3cret"], keys=["~*"], channels=["*"], commands=["+@all"]
        )
        try:
            host = f"127.0.0.1:{redis_server.port}"
            with open_store(f"redis://writer:s3cret@{host}/0?socket_timeout=3&namespace=blue") as blue:
                assert isinstance(blue, RedisStore) and blue.namespace == "blue"
                assert blue._redis.connection_pool.connection_kwargs["socket_timeout"] == 3.0
                put(blue, "t", "task", make_blob(1))
                with open_store(f"redis://writer:s3cret@{host}/0") as default_namespace:
                    assert default_namespace.list("t") == []  # namespaces keep deployments apart
            with open_store(f"redis://writer:guessed@{host}/0") as intruder:
                with pytest.raises(StoreUnavailable) as refused:
                    intruder.ping()
                assert "guessed" not in str(refused.value)
        finally:
            admin.acl_deluser("writer")


def test_rediss_urls_use_tls() -> None:
    with open_store("rediss://127.0.0.1:1/0?ssl_cert_reqs=required") as secure:
        assert secure._redis.connection_pool.connection_class is redis.SSLConnection  # type: ignore[attr-defined]


def test_an_unreachable_redis_fails_fast_with_store_unavailable() -> None:
    with RedisStore(f"redis://127.0.0.1:{free_port()}/0") as dead:
        started = time.monotonic()
        for call in (dead.ping, lambda: dead.head("t", "task"), lambda: put(dead, "t", "task", make_blob(1))):
            with pytest.raises(StoreUnavailable, match="redis is unreachable"):
                call()
        # three calls, each retried with backoff (about half a second in all); the bound is "not hung"
        assert time.monotonic() - started < 20.0
        with pytest.raises(InvalidName):  # names are checked before the network
            dead.head("t", "../x")


def test_every_redis_error_is_translated(store: RedisStore, redis_server: RedisServer) -> None:
    with redis_server.client() as admin:
        admin.config_set("maxmemory", "1")
        try:
            with pytest.raises(StoreUnavailable, match="redis refused"):
                put(store, "t", "task", make_blob(1))  # OOM command not allowed
        finally:
            admin.config_set("maxmemory", "0")
    put(store, "t", "task", make_blob(1))


def test_a_replayed_write_returns_its_first_outcome(store: RedisStore) -> None:
    """redis-py retries a command whose reply was lost; the script must not bump the version twice."""
    blob = make_blob(1)
    sha = hashlib.sha256(blob).hexdigest()
    store._redis.set(f"prefix-serve:blob:{sha}", blob)
    keys = [
        "prefix-serve:rec:t:task",
        "prefix-serve:idx:t",
        "prefix-serve:refs",
        "prefix-serve:seq",
        f"prefix-serve:blob:{sha}",
        "prefix-serve:op:fixed",
        "prefix-serve:usage:t",
    ]
    args = [
        "",
        "t",
        "task",
        sha,
        4,
        len(blob),
        "1.5",
        "native",
        "prefix-serve:blob:",
        60,
        "prefix-serve:changes",
        "x",
        "prefix",
        "prefix-serve:rec:t:",
        "",
        "",
    ]
    first = store._put_script(keys=keys, args=args)
    replay = store._put_script(keys=keys, args=args)
    assert first == replay and store.head("t", "task").version.startswith("1-")
    assert store._redis.hget("prefix-serve:refs", sha) == b"1"


def test_blob_ttls_follow_references(store: RedisStore) -> None:
    old, _ = put(store, "t", "task", make_blob(1))
    put(store, "t", "task", make_blob(2))
    old_key = f"prefix-serve:blob:{old.sha256}"
    assert 0 < store._redis.ttl(old_key) <= 60  # unreferenced: expires after the grace period
    put(store, "t", "other", make_blob(1))
    assert store._redis.ttl(old_key) == -1  # referenced again: kept for good
    assert store._redis.hgetall("prefix-serve:refs") == {
        old.sha256.encode(): b"1",
        store.head("t", "task").sha256.encode(): b"1",
    }


def test_the_feed_resyncs_after_its_connection_is_killed(redis_url: str, redis_server: RedisServer) -> None:
    with RedisStore(redis_url) as listener, RedisStore(redis_url) as writer, redis_server.client() as admin:
        resyncs: list[float] = []
        heard: list[str] = []
        listener.subscribe(
            lambda event: heard.append(event.version), on_resync=lambda: resyncs.append(time.monotonic())
        )
        wait_for(lambda: len(resyncs) == 1, what="the listener subscribes")
        assert admin.client_kill_filter(_type="pubsub") >= 1
        wait_for(lambda: len(resyncs) == 2, what='it resubscribes: "you may have missed events"')
        record, _ = put(writer, "t", "task", make_blob(1))
        wait_for(lambda: heard == [record.version], what="the new connection carries the event")
