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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prefix_store.cache.registry import PrefixRegistry  # noqa: E402
from prefix_store.geometry import ModelGeometry  # noqa: E402
from prefix_store.storage.store import PrefixStore, open_store  # noqa: E402
from server.benchmark.store_costs import (  # noqa: E402
    NUM_VIRTUAL_TOKENS,
    TENANT,
    measure_load,
    measure_thrash,
    prefix_blobs,
    registry_for,
    summary_ms,
    sync,
)

GEOMETRY = ModelGeometry(model_type="llama", num_layers=32, num_kv_heads=8, head_dim=128)
DTYPE = torch.bfloat16
PREFIX_BYTES = NUM_VIRTUAL_TOKENS * GEOMETRY.bytes_per_virtual_token(2)


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
    registry = registry_for(store, GEOMETRY, DTYPE, device, budget_prefixes=16)
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
    from testing.redis_server import RedisServer

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
    blobs = prefix_blobs(GEOMETRY, DTYPE, 8)
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
            load = measure_load(store, GEOMETRY, DTYPE, device, blobs, args.samples)
            print(f"[{name}] thrash ...", file=sys.stderr, flush=True)
            thrash = measure_thrash(store, GEOMETRY, DTYPE, device, blobs, args.thrash_rounds)
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
