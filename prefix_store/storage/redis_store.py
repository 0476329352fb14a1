"""The Redis store (shared by replicas): ``redis://[[user]:password@]host:port/db``, ``rediss://…``, ``unix://…``.

Keys (``ns`` = the namespace, default ``prefix-serve``; names are validated, so ``:`` never occurs in them):

    ns:blob:<sha256>          native prefix bytes, content-addressed; a TTL while unreferenced
    ns:rec:<tenant>:<task>    JSON record naming the task's current version
    ns:idx:<tenant>           sorted set of the tenant's task ids (lexicographic pages)
    ns:usage:<tenant>         hash: the tenant's current versions and their bytes (its quota's figures)
    ns:refs                   hash sha256 -> number of records naming the blob
    ns:seq                    hash "<tenant>/<task>" -> last upload sequence (survives deletes)
    ns:op:<uuid>              outcome of one put/delete, for replays after a lost reply
    channel ns:changes        JSON change events

A put writes the blob first (``SET NX`` with a TTL, so a writer that dies leaves an orphan that
expires), then one Lua script checks the precondition (``if_match``, ``if_absent``) and the tenant's
quota, bumps the version, swaps the pointer, updates the tenant's usage, moves the reference counts and
publishes the event, atomically: replicas sharing the Redis never pass a quota together. Transport errors
(connection, timeout) are retried with exponential backoff by redis-py; every Redis exception becomes
``StoreUnavailable`` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from prefix_store.errors import PrefixNotFound, QuotaExceeded, StoreUnavailable, VersionMismatch
from prefix_store.storage import redis_scripts
from prefix_store.storage.changes import ChangeEvent
from prefix_store.storage.names import validate_task_id, validate_tenant
from prefix_store.storage.store import (
    DEFAULT_PAGE_SIZE,
    Precondition,
    PrefixRecord,
    PrefixStore,
    Quota,
    RecordPage,
    TaskKey,
    TenantUsage,
    check_page_args,
)

log = logging.getLogger(__name__)

_MGET_CHUNK = 512


class RedisStore(PrefixStore):
    """Prefixes in Redis. Connection options come from the URL (query options win, as in redis-py's
    ``from_url``: ``socket_timeout``, ``ssl_ca_certs``, ``password``, …); the keyword arguments are the
    defaults. ``gc_grace_s``: how long an unreferenced blob stays (0: deleted at once);
    ``upload_ttl_s``: how long a blob written by a writer that never wrote its record stays."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "prefix-serve",
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        socket_read_size: int = 4 << 20,
        retries: int = 2,
        max_connections: int = 32,
        health_check_interval: int = 10,
        gc_grace_s: float = 300.0,
        upload_ttl_s: int = 3600,
    ) -> None:
        super().__init__()
        url, namespace = _pop_namespace(url, namespace)
        validate_tenant(namespace)  # the same safe alphabet as names
        connection: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            # blobs are megabytes: redis-py's 32 KiB reads make a 2.5 MiB GET about 3x slower
            "socket_read_size": socket_read_size,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),  # transport errors only
            "health_check_interval": health_check_interval,
            "client_name": "prefix-serve",
        }
        # waiting for a free pooled connection is bounded like a socket read
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout, **connection
        )
        self._redis = redis.Redis(connection_pool=pool)
        # the feed's own client: one long-lived connection outside the pool, so it never starves writers
        self._feed_redis = redis.Redis.from_url(url, **connection)
        self.namespace = namespace
        self.gc_grace_s = gc_grace_s
        self.upload_ttl_s = upload_ttl_s
        self._channel = f"{namespace}:changes"
        self._origin = uuid.uuid4().hex  # our own events reach our subscribers directly, not via Redis
        self._put_script = self._redis.register_script(redis_scripts.PUT)
        self._delete_script = self._redis.register_script(redis_scripts.DELETE)
        self._usage_script = self._redis.register_script(redis_scripts.USAGE)
        self._feed_lock = threading.Lock()
        self._feed_thread: threading.Thread | None = None
        self._closed = threading.Event()

    def put(
        self,
        tenant: str,
        task_id: str,
        blob: bytes,
        *,
        num_virtual_tokens: int,
        source_format: str,
        kind: str = "prefix",
        if_match: str | Collection[str] | None = None,
        if_absent: bool = False,
        quota: Quota | None = None,
    ) -> tuple[PrefixRecord, bool]:
        record_key = self._record_key(tenant, task_id)
        quota = quota or Quota()
        precondition = Precondition.of(if_match, if_absent)
        sha256 = hashlib.sha256(blob).hexdigest()
        blob_key = f"{self.namespace}:blob:{sha256}"
        keys = [
            record_key,
            f"{self.namespace}:idx:{tenant}",
            f"{self.namespace}:refs",
            f"{self.namespace}:seq",
            blob_key,
            f"{self.namespace}:op:{uuid.uuid4().hex}",
            self._usage_key(tenant),
        ]
        args = [
            _condition_arg(precondition),
            tenant,
            task_id,
            sha256,
            num_virtual_tokens,
            len(blob),
            repr(time.time()),
            source_format,
            f"{self.namespace}:blob:",
            self.gc_grace_s,
            self._channel,
            self._origin,
            kind,
            self._records_of(tenant),
            _limit_arg(quota.max_prefixes),
            _limit_arg(quota.max_bytes),
        ]
        with _redis_errors("store a prefix"):
            for _ in range(3):
                # blob first; if it already exists (same content elsewhere) it is left as it is
                self._redis.set(blob_key, blob, nx=True, ex=self.upload_ttl_s)
                result = self._put_script(keys=keys, args=args)
                if _text(result[0]) != "NOBLOB":  # else: an unreferenced copy expired meanwhile
                    break
            else:
                raise StoreUnavailable("the uploaded blob keeps disappearing; try again")
        if _text(result[0]) == "MISMATCH":
            raise _mismatch(precondition, result)
        if _text(result[0]) == "QUOTA":
            raise QuotaExceeded(_text(result[1]), int(result[2]), int(result[3]))
        record = PrefixRecord.from_json(json.loads(result[1]))
        self._publish(ChangeEvent(tenant, task_id, record.version))
        return record, bool(int(result[2]))

    def head(self, tenant: str, task_id: str) -> PrefixRecord:
        key = self._record_key(tenant, task_id)
        with _redis_errors("read a prefix record"):
            data = self._redis.get(key)
        if data is None:
            raise PrefixNotFound(f"no prefix named {task_id!r}", name=task_id)
        return PrefixRecord.from_json(json.loads(data))

    def head_many(self, keys: Iterable[TaskKey]) -> dict[TaskKey, PrefixRecord | None]:
        wanted = list(keys)
        redis_keys = [self._record_key(tenant, task_id) for tenant, task_id in wanted]
        found: dict[TaskKey, PrefixRecord | None] = {}
        with _redis_errors("read prefix records"):
            for start in range(0, len(wanted), _MGET_CHUNK):
                values = self._redis.mget(redis_keys[start : start + _MGET_CHUNK])
                for key, value in zip(wanted[start : start + _MGET_CHUNK], values, strict=True):
                    found[key] = PrefixRecord.from_json(json.loads(value)) if value is not None else None
        return found

    def get_blob(self, record: PrefixRecord) -> bytes:
        if len(record.sha256) != 64 or any(c not in "0123456789abcdef" for c in record.sha256):
            raise PrefixNotFound("malformed blob address")
        with _redis_errors("read a prefix blob"):
            data = self._redis.get(f"{self.namespace}:blob:{record.sha256}")
        if data is None:
            raise PrefixNotFound(f"the blob of {record.task_id!r} version {record.version} is gone")
        return bytes(data)

    def list_page(
        self, tenant: str, *, cursor: str | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> RecordPage:
        check_page_args(tenant, cursor, limit)
        start = f"({cursor}" if cursor is not None else "-"
        with _redis_errors("list prefixes"):
            names = [
                _text(n)
                for n in self._redis.zrangebylex(f"{self.namespace}:idx:{tenant}", start, "+", 0, limit + 1)
            ]
            values = self._redis.mget([self._record_key(tenant, n) for n in names]) if names else []
        records = [PrefixRecord.from_json(json.loads(v)) for v in values[:limit] if v is not None]
        return RecordPage(records, names[limit - 1] if len(names) > limit else None)

    def delete(self, tenant: str, task_id: str, *, if_match: str | Collection[str] | None = None) -> None:
        precondition = Precondition.of(if_match)
        keys = [
            self._record_key(tenant, task_id),
            f"{self.namespace}:idx:{tenant}",
            f"{self.namespace}:refs",
            f"{self.namespace}:op:{uuid.uuid4().hex}",
            self._usage_key(tenant),
        ]
        args = [
            _condition_arg(precondition),
            tenant,
            task_id,
            f"{self.namespace}:blob:",
            self.gc_grace_s,
            self._channel,
            self._origin,
            self._records_of(tenant),
        ]
        with _redis_errors("delete a prefix"):
            result = self._delete_script(keys=keys, args=args)
        status = _text(result[0])
        if status == "NOTFOUND":
            raise PrefixNotFound(f"no prefix named {task_id!r}", name=task_id)
        if status == "MISMATCH":
            raise _mismatch(precondition, result)
        self._publish(ChangeEvent(tenant, task_id, _text(result[1]), deleted=True))

    def usage(self, tenant: str) -> TenantUsage:
        keys = [self._usage_key(tenant), f"{self.namespace}:idx:{tenant}"]
        with _redis_errors("read a tenant's usage"):
            prefixes, used = self._usage_script(keys=keys, args=[self._records_of(tenant)])
        return TenantUsage(int(prefixes), int(used))

    def ping(self) -> None:
        with _redis_errors("reach redis"):
            self._redis.ping()

    def close(self) -> None:
        self._closed.set()
        thread = self._feed_thread
        if thread is not None:
            thread.join(timeout=5)
        self._redis.close()
        self._feed_redis.close()

    def _record_key(self, tenant: str, task_id: str) -> str:
        return f"{self._records_of(tenant)}{validate_task_id(task_id)}"

    def _records_of(self, tenant: str) -> str:
        """What the keys of the tenant's records begin with."""
        return f"{self.namespace}:rec:{validate_tenant(tenant)}:"

    def _usage_key(self, tenant: str) -> str:
        return f"{self.namespace}:usage:{validate_tenant(tenant)}"

    def _start_feed(self) -> None:
        with self._feed_lock:
            if self._feed_thread is None and not self._closed.is_set():
                self._feed_thread = threading.Thread(
                    target=self._run_feed, name="prefix-store-feed", daemon=True
                )
                self._feed_thread.start()

    def _run_feed(self) -> None:
        """Listen on the channel until closed. Every (re)subscription, including redis-py's automatic
        one after a reconnect, tells subscribers to resync: events sent meanwhile are lost."""
        backoff = 0.05
        while not self._closed.is_set():
            pubsub = self._feed_redis.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        backoff = 0.05
                        self._changes.resync()
                    elif message["type"] == "message":
                        self._deliver(message["data"])
            except redis.RedisError as exc:
                log.debug("prefix store feed: %s; reconnecting in %.2fs", exc, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()

    def _deliver(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
            if payload.get("origin") == self._origin:
                return  # delivered to our subscribers when we made the change
            event = ChangeEvent.from_json(payload)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("prefix store feed: ignoring a malformed event")
            return
        self._changes.publish(event)


def _pop_namespace(url: str, default: str) -> tuple[str, str]:
    """Take our own ``namespace`` query option out of the URL (redis-py would reject it)."""
    parsed = urlparse(url)
    query = parse_qsl(parsed.query, keep_blank_values=True)
    namespace = next((value for name, value in query if name == "namespace"), default)
    rest = urlencode([(name, value) for name, value in query if name != "namespace"])
    return urlunparse(parsed._replace(query=rest)), namespace


def _condition_arg(precondition: Precondition | None) -> str:
    """The scripts' precondition argument: '' for none, else JSON with only the keys that are set (Lua's
    cjson reads a JSON null as a value, not as nil)."""
    if precondition is None:
        return ""
    condition: dict[str, object] = {}
    if precondition.exists is not None:
        condition["exists"] = precondition.exists
    if precondition.versions is not None:
        condition["versions"] = sorted(precondition.versions)
    return json.dumps(condition)


def _limit_arg(limit: int | None) -> str:
    """A quota limit as the put script reads it ('' for none)."""
    return "" if limit is None else str(limit)


def _mismatch(precondition: Precondition | None, result: list[Any]) -> VersionMismatch:
    """The ``VersionMismatch`` of a script's ``{'MISMATCH', current version or ''}``."""
    assert precondition is not None  # a script answers MISMATCH only to a precondition
    return precondition.mismatch(_text(result[1]) or None)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def _redis_errors(doing: str) -> Iterator[None]:
    """Translate every Redis exception at the edge: nothing of redis-py leaves this module."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"cannot {doing}: redis is unreachable ({exc})") from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(f"cannot {doing}: redis refused ({exc})") from exc
