"""A writer killed with SIGKILL at any point of an upload leaves the previous version whole and serving;
an acknowledged upload survives the death of the process that made it. Both backends.

One writer process per crash point, all at once (each on its own task), to pay the start-up once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.redis_store import RedisStore
from prefix_store.storage.store import PrefixStore
from tests.prefix_store.conftest import make_blob, put

pytestmark = pytest.mark.e2e  # starts servers or other processes

ROOT = Path(__file__).resolve().parents[2]
CRASH_POINTS = {
    "file": ["blob-partial", "blob-written", "record-partial"],
    "redis": ["blob-partial", "blob-written"],
}


def _url(store: PrefixStore) -> str:
    if isinstance(store, FileStore):
        return store.root.as_uri()
    assert isinstance(store, RedisStore)
    kwargs = store._redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def _kill_writers_at(url: str, plan: dict[str, tuple[str, int]], folder: Path) -> dict[str, str]:
    """Start one writer per task (``task -> (point, seed)``), in the plan's order, each once the one before
    has reported its point (a writer stopped inside the tenant's usage lock holds it until it is killed:
    one started after it would wait there for ever); kill -9 them all; return each task's first line
    (``AT <point>`` or ``ACK <version>``)."""
    lines: dict[str, str] = {}
    processes: list[subprocess.Popen[str]] = []
    try:
        for task, (point, seed) in plan.items():
            (folder / f"{task}.blob").write_bytes(make_blob(seed))
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.prefix_store.crashing_writer",
                    url,
                    point,
                    str(folder / f"{task}.blob"),
                    task,
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            assert process.stdout is not None
            lines[task] = process.stdout.readline().strip()
            if lines[task].startswith("ACK"):  # it stops right after acknowledging
                assert process.stdout.readline().strip() == "AT acked"
    finally:
        for process in processes:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return lines


def test_killed_writers_leave_previous_versions_and_acknowledged_uploads_survive(
    backend: str, store_factory: Callable[..., PrefixStore], tmp_path: Path
) -> None:
    store = store_factory(gc_grace_s=0)
    points = CRASH_POINTS[backend]
    previous = {point: put(store, "t", point, make_blob(10 + i))[0] for i, point in enumerate(points)}
    put(store, "t", "acked", make_blob(1))
    plan = {"acked": ("acked", 2)} | {point: (point, 20 + i) for i, point in enumerate(points)}

    lines = _kill_writers_at(_url(store), plan, tmp_path)

    assert all(lines[point] == f"AT {point}" for point in points), lines
    reopened = store_factory(gc_grace_s=0)
    for i, point in enumerate(points):  # every torn upload left the previous version, whole
        assert reopened.get("t", point) == (previous[point], make_blob(10 + i))
    acked, blob = reopened.get("t", "acked")  # the acknowledged one is there
    assert lines["acked"] == f"ACK {acked.version}" and blob == make_blob(2)
    assert [r.task_id for r in reopened.list("t")] == sorted([*points, "acked"])

    if isinstance(reopened, FileStore):  # the dead writers' temporary files and orphan blobs are collected
        reopened.collect_garbage()
        assert not list(reopened.root.rglob("*.tmp"))
        live = {r.sha256 for r in reopened.list("t")}
        assert {p.stem for p in reopened.root.glob("blobs/*/*.safetensors")} == live
    else:  # an orphan blob expires on its own; referenced blobs never do
        client = reopened._redis  # type: ignore[attr-defined]
        ttls = {
            key.decode().rsplit(":", 1)[1]: client.ttl(key) for key in client.scan_iter("prefix-serve:blob:*")
        }
        live = {r.sha256 for r in reopened.list("t")}
        assert all(ttls[sha] == -1 for sha in live)
        assert [sha for sha, ttl in ttls.items() if sha not in live and ttl > 0] != []

    for point in points:  # nothing is stuck (locks die with their holder): the next upload works
        after, replaced = put(reopened, "t", point, make_blob(30))
        assert replaced and reopened.get("t", point) == (after, make_blob(30))
