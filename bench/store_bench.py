"""Prefix store and registry benchmark: load latency store → device, thrashing cost, and how fast an upload
becomes visible on another replica. Every number comes from one run, baselines included.

    python bench/store_bench.py --out bench/results/store.json [--device auto|cpu|cuda] [--backends file,redis]

Prefixes of 20 virtual tokens for an 8B-Llama-shaped model (32 layers, 8 kv heads, head_dim 128),
bf16: 2.5 MiB each.

  load          ``PrefixRegistry.acquire`` of a version that is not resident (a registry whose budget
                holds one prefix, cycling over 16 tasks, so every acquire is a miss): record read, blob
                read, validation, decode, cast, placement. Reported with its parts and as a ratio to the
                raw read of the same bytes in the same run (file: ``read_bytes`` of the blob file, from
                the page cache; Redis: one ``GET`` of the blob key on the same client).
  thrash        acquire + release throughput when the working set is 2x the budget (every acquire a
                miss) against all-resident (every acquire a hit), one thread.
  visibility    another replica (a second process with its own store client and registry):
                ack → served: the upload's ``put`` returned, then the replica's first ``acquire``
                returned the new version; ack → resident: the replica loaded the new version with no
                request asking (change feed + prefetch for Redis; reconcile for the file store, whose
                feed does not cross processes).

Redis: a ``redis-server`` started on a free port (``--redis-url`` to use another), no persistence.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prefix_store import ModelGeometry, Prefix, PrefixLimits, encode_native  # noqa: E402
from prefix_store.loading import fetch_prefix, place_prefix  # noqa: E402
from prefix_store.registry import PrefixRegistry  # noqa: E402
from prefix_store.store import PrefixStore, open_store  # noqa: E402

GEOMETRY = ModelGeometry(model_type="llama", num_layers=32, num_kv_heads=8, head_dim=128)
NUM_VIRTUAL_TOKENS = 20
DTYPE = torch.bfloat16
PREFIX_BYTES = NUM_VIRTUAL_TOKENS * GEOMETRY.bytes_per_virtual_token(2)
TENANT = "bench"


def make_blobs(count: int) -> list[bytes]:
    generator = torch.Generator().manual_seed(0)
    shape = GEOMETRY.prefix_shape(NUM_VIRTUAL_TOKENS)
    return [
        encode_native(
            Prefix(
                torch.randn(shape, generator=generator).to(DTYPE),
                torch.randn(shape, generator=generator).to(DTYPE),
            ),
            GEOMETRY,
        )
        for _ in range(count)
    ]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_ms(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
        "n": len(samples),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def registry_for(
    store: PrefixStore, device: torch.device, budget_prefixes: int, **options: Any
) -> PrefixRegistry:
    return PrefixRegistry(
        store,
        GEOMETRY,
        device=device,
        dtype=DTYPE,
        limits=PrefixLimits(),
        budget_bytes=budget_prefixes * PREFIX_BYTES,
        **options,
    )


def raw_reader(store: PrefixStore) -> Callable[[str], bytes]:
    """Read a blob the plainest way the backend allows, bypassing the store's code."""
    if hasattr(store, "root"):
        root = store.root  # type: ignore[attr-defined]
        return lambda sha: (root / "blobs" / sha[:2] / f"{sha}.safetensors").read_bytes()
    client, namespace = store._redis, store.namespace  # type: ignore[attr-defined]
    return lambda sha: client.get(f"{namespace}:blob:{sha}")


def bench_load(store: PrefixStore, device: torch.device, blobs: list[bytes], samples: int) -> dict[str, Any]:
    tasks = [f"load-{i}" for i in range(16)]
    records = [
        store.put(TENANT, t, blobs[i % len(blobs)], num_virtual_tokens=20, source_format="native")[0]
        for i, t in enumerate(tasks)
    ]
    read_raw = raw_reader(store)
    parts: dict[str, list[float]] = {
        k: [] for k in ("acquire", "raw_read", "head", "get_blob", "decode_cast", "place")
    }
    with registry_for(
        store, device, budget_prefixes=1, prefetch_on_change=False, reconcile_interval_s=None
    ) as registry:
        for i in range(samples + 10):  # the first 10 warm up
            task, record = tasks[i % len(tasks)], records[i % len(tasks)]
            started = time.perf_counter()
            read_raw(record.sha256)
            raw = time.perf_counter() - started
            started = time.perf_counter()
            handle = registry.acquire(TENANT, task)
            sync(device)
            acquire = time.perf_counter() - started
            registry.release(handle)
            # the parts, measured on their own right after
            t0 = time.perf_counter()
            store.head(TENANT, task)
            t1 = time.perf_counter()
            store.get_blob(record)
            t2 = time.perf_counter()
            cpu = fetch_prefix(store, record, GEOMETRY, PrefixLimits(), DTYPE)
            t3 = time.perf_counter()
            place_prefix(cpu, device)
            sync(device)
            t4 = time.perf_counter()
            if i >= 10:
                for name, value in (
                    ("acquire", acquire),
                    ("raw_read", raw),
                    ("head", t1 - t0),
                    ("get_blob", t2 - t1),
                    ("decode_cast", (t3 - t2) - (t2 - t1)),
                    ("place", t4 - t3),
                ):
                    parts[name].append(value)
        stats = registry.stats()
        assert stats.misses == samples + 10 and stats.hits == 0, stats
    result = {name: summary_ms(values) for name, values in parts.items()}
    result["ratio_p50"] = result["acquire"]["p50_ms"] / result["raw_read"]["p50_ms"]
    result["ratio_p99"] = result["acquire"]["p99_ms"] / result["raw_read"]["p99_ms"]
    return result


def bench_thrash(store: PrefixStore, device: torch.device, blobs: list[bytes], rounds: int) -> dict[str, Any]:
    budget = 8
    tasks = [f"thrash-{i}" for i in range(2 * budget)]
    for i, task in enumerate(tasks):
        store.put(TENANT, task, blobs[i % len(blobs)], num_virtual_tokens=20, source_format="native")
    result: dict[str, Any] = {}
    for name, working_set in (("all_resident", tasks[:budget]), ("working_set_2x_budget", tasks)):
        with registry_for(store, device, budget_prefixes=budget, reconcile_interval_s=None) as registry:
            for task in working_set:
                registry.release(registry.acquire(TENANT, task))
            count = rounds * len(tasks)
            started = time.perf_counter()
            for i in range(count):
                registry.release(registry.acquire(TENANT, working_set[i % len(working_set)]))
            sync(device)
            elapsed = time.perf_counter() - started
            stats = registry.stats()
            result[name] = {"acquires_per_s": count / elapsed, "hits": stats.hits, "misses": stats.misses}
    result["slowdown"] = (
        result["all_resident"]["acquires_per_s"] / result["working_set_2x_budget"]["acquires_per_s"]
    )
    return result


class Replica:
    """This script in ``--replica`` mode: another process with its own store client and registry."""

    def __init__(self, url: str, device: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--replica", url, "--device", device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == {"ready": True}

    def send(self, *command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(command) + "\n")
        self.process.stdin.flush()

    def read(self) -> Any:
        assert self.process.stdout is not None
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.send("quit")
        self.process.wait(timeout=30)


def bench_visibility(
    store: PrefixStore, url: str, device: str, blobs: list[bytes], trials: int, jitter_s: float
) -> dict[str, Any]:
    replica = Replica(url, device)
    served: list[float] = []
    resident: list[float] = []
    try:
        for trial in range(trials):
            task = f"swap-{trial % 4}"
            store.put(TENANT, task, blobs[trial % len(blobs)], num_virtual_tokens=20, source_format="native")
            replica.send("warm", task)
            replica.read()
            # ack -> resident, with no request asking; at a random moment of the replica's reconcile cycle
            replica.send("arm", task)
            replica.read()
            time.sleep(random.uniform(0, jitter_s))
            record, _ = store.put(
                TENANT, task, blobs[(trial + 1) % len(blobs)], num_virtual_tokens=20, source_format="native"
            )
            acked = time.monotonic()
            seen = replica.read()
            assert seen["version"] == record.version, (seen, record)
            resident.append(max(0.0, seen["at"] - acked))
            # ack -> first request served
            record, _ = store.put(
                TENANT, task, blobs[(trial + 2) % len(blobs)], num_virtual_tokens=20, source_format="native"
            )
            acked = time.monotonic()
            replica.send("acquire", task)
            answer = replica.read()
            assert answer["version"] == record.version, (answer, record)
            served.append(answer["at"] - acked)
    finally:
        replica.close()
    return {"ack_to_served": summary_ms(served), "ack_to_resident": summary_ms(resident)}


def run_replica(url: str, device: torch.device) -> None:
    store = open_store(url)
    registry = registry_for(store, device, budget_prefixes=16)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "warm":
            registry.release(registry.acquire(TENANT, args[0]))
            print(json.dumps({"ok": True}), flush=True)
        elif command == "arm":
            before = registry.resident_version(TENANT, args[0])
            threading.Thread(target=_watch, args=(registry, args[0], before), daemon=True).start()
            print(json.dumps({"armed": True}), flush=True)
        elif command == "acquire":
            handle = registry.acquire(TENANT, args[0])
            sync(device)
            at = time.monotonic()
            registry.release(handle)
            print(json.dumps({"version": handle.record.version, "at": at}), flush=True)
        else:
            break
    registry.close()
    store.close()


def _watch(registry: PrefixRegistry, task: str, before: str | None) -> None:
    while (version := registry.resident_version(TENANT, task)) in (before, None):
        time.sleep(0.0002)
    print(json.dumps({"version": version, "at": time.monotonic()}), flush=True)


@contextmanager
def redis_server() -> Iterator[str]:
    from tests.redis_server import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="store-bench-redis-"))
    server = RedisServer(folder)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def backend_url(name: str, redis_url: str | None) -> Iterator[str]:
    if name == "file":
        folder = Path(tempfile.mkdtemp(prefix="store-bench-"))
        try:
            yield folder.as_uri()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    elif redis_url:
        yield redis_url
    else:
        with redis_server() as url:
            yield url


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, ...]] = []
    for backend, r in results["backends"].items():
        load = r["load"]
        rows.append(
            (
                backend,
                "load (acquire, miss)",
                f"{load['acquire']['p50_ms']:.2f}",
                f"{load['acquire']['p99_ms']:.2f}",
                f"{load['ratio_p50']:.2f}x / {load['ratio_p99']:.2f}x raw",
            )
        )
        rows.append(
            (
                backend,
                "  raw read of the bytes",
                f"{load['raw_read']['p50_ms']:.2f}",
                f"{load['raw_read']['p99_ms']:.2f}",
                "",
            )
        )
        for part in ("head", "get_blob", "decode_cast", "place"):
            rows.append(
                (backend, f"  part: {part}", f"{load[part]['p50_ms']:.2f}", f"{load[part]['p99_ms']:.2f}", "")
            )
        thrash = r["thrash"]
        rows.append(
            (
                backend,
                "thrash: working set 2x budget",
                f"{thrash['working_set_2x_budget']['acquires_per_s']:.0f}/s",
                "",
                f"{thrash['slowdown']:.1f}x slower than all-resident ({thrash['all_resident']['acquires_per_s']:.0f}/s)",
            )
        )
        for name in ("ack_to_served", "ack_to_resident"):
            v = r["visibility"][name]
            rows.append(
                (
                    backend,
                    f"upload {name.replace('_', ' ')} (other replica)",
                    f"{v['p50_ms']:.2f}",
                    f"{v['p99_ms']:.2f}",
                    f"n={v['n']}",
                )
            )
    header = ("backend", "measure", "p50 ms", "p99 ms", "note")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            *header,
            title=f"prefix store bench: 20 virtual tokens, 32x8x128 bf16 ({PREFIX_BYTES / 2**20:.1f} MiB), device {results['device']}",
        )
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        print(" | ".join(header))
        for row in rows:
            print(" | ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backends", default="file,redis")
    parser.add_argument(
        "--redis-url", help="use this Redis instead of starting one (its keys are written to!)"
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--thrash-rounds", type=int, default=20)
    parser.add_argument("--visibility-trials", type=int, default=50)
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.replica:
        run_replica(args.replica, device)
        return
    blobs = make_blobs(8)
    results: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "prefix_bytes": PREFIX_BYTES,
        "backends": {},
    }
    for name in args.backends.split(","):
        with backend_url(name, args.redis_url) as url, open_store(url) as store:
            print(f"[{name}] load ...", file=sys.stderr, flush=True)
            load = bench_load(store, device, blobs, args.samples)
            print(f"[{name}] thrash ...", file=sys.stderr, flush=True)
            thrash = bench_thrash(store, device, blobs, args.thrash_rounds)
            # the file store's other replicas learn by reconcile (1 s): fewer trials keep the run short
            trials = args.visibility_trials if name == "redis" else max(5, args.visibility_trials // 3)
            print(f"[{name}] visibility ({trials} trials) ...", file=sys.stderr, flush=True)
            jitter = 1.0 if name == "file" else 0.05  # the replica's reconcile interval is 1 s
            visibility = bench_visibility(store, url, str(device), blobs, trials, jitter)
            results["backends"][name] = {"load": load, "thrash": thrash, "visibility": visibility}
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
