"""A writer process for the crash tests: ``python -m tests.prefix_store.crashing_writer URL POINT BLOB TASK``.

It uploads the file BLOB as task ``t/TASK`` (it imports no torch, so it starts fast) and stops dead at ``POINT`` (printing ``AT <POINT>``
and sleeping) so the test can ``kill -9`` it there; after a completed upload it prints ``ACK <version>``
and sleeps, so the test can kill a process whose upload was acknowledged.

Points: ``blob-partial`` (half the blob sent or written), ``blob-written`` (blob stored, record not yet),
``record-partial`` (filesystem: half the record written to its temporary file), ``acked``.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import prefix_store.storage.filesystem as filesystem
from prefix_store.storage.redis_store import RedisStore
from prefix_store.storage.store import open_store


def _stop_here(point: str) -> None:
    print(f"AT {point}", flush=True)
    time.sleep(120)
    raise SystemExit("not killed")


def _patch_filesystem(point: str) -> None:
    real_write = filesystem._atomic_write

    def write(path: Path, data: bytes) -> None:
        is_blob = path.suffix == ".safetensors"
        if (point == "blob-partial" and is_blob) or (point == "record-partial" and not is_blob):
            temp = path.parent / f".{path.name}.crash.tmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("wb") as file:
                file.write(data[: len(data) // 2])
                file.flush()
            _stop_here(point)
        real_write(path, data)
        if point == "blob-written" and is_blob:
            _stop_here(point)

    filesystem._atomic_write = write


def _patch_redis(store: RedisStore, point: str) -> None:
    real_set = store._redis.set
    kwargs: dict[str, Any] = store._redis.connection_pool.connection_kwargs

    def set_blob(key: str, value: bytes, **options: Any) -> Any:
        if point == "blob-partial":  # the command is half on the wire when the process dies
            with socket.create_connection((kwargs["host"], kwargs["port"])) as sock:
                head = f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${len(value)}\r\n".encode()
                sock.sendall(head + value[: len(value) // 2])
                _stop_here(point)
        result = real_set(key, value, **options)
        if point == "blob-written":
            _stop_here(point)
        return result

    store._redis.set = set_blob  # type: ignore[method-assign]


def main(url: str, point: str, blob_path: str, task_id: str) -> None:
    store = open_store(url, gc_interval_s=None) if url.startswith("file:") else open_store(url)
    if isinstance(store, RedisStore):
        _patch_redis(store, point)
    else:
        _patch_filesystem(point)
    blob = Path(blob_path).read_bytes()
    record, _ = store.put("t", task_id, blob, num_virtual_tokens=4, source_format="native")
    print(f"ACK {record.version}", flush=True)
    _stop_here("acked")


if __name__ == "__main__":
    main(*sys.argv[1:5])
