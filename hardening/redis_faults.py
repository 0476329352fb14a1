"""Redis faults against a server on the Redis store: Redis killed mid-load and restarted, its pub/sub
connections killed, and Redis paused (``CLIENT PAUSE``).

    python -m hardening.redis_faults --out hardening/results/redis_faults.json

- **Outage**: while clients keep generating, Redis is SIGKILLed, left down, then restarted on the same
  port with its data. A prefix resident on the server keeps serving (200) throughout; a cold prefix
  and uploads get 503 promptly; nothing else is answered. Measured: the time from Redis answering
  again to the cold prefix serving again, without restarting the server (target ≤ 10 s).
- **Pub/sub killed**: another replica (this process, writing through its own ``RedisStore``) replaces
  a prefix resident on the server while every pub/sub connection is being killed, so the change
  event is lost. Measured: the time until the server has the new version resident (the reconcile
  catches it; target ≤ the reconcile interval + 1 s) and until its feed is subscribed again.
- **Pause**: ``CLIENT PAUSE`` stalls Redis while 40 clients ask for cold prefixes and uploads at once:
  each gets a 503 (or a 200, if the pause ended first) within a bound, resident prefixes keep
  serving, and right after the pause 64 concurrent requests all succeed (the connection pool was
  not left exhausted).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hardening.common import FUZZ_SETTINGS, TENANT, make_keys, write_result
from hardening.prefixes import model_geometry, native_prefix, upload
from prefix_store.storage.store import open_store
from server.demo_model import ensure_demo_model
from testing.redis_server import RedisServer
from testing.server_process import ServerProcess

RECONCILE_S = 1.0
# The store's Redis socket timeout (a store URL option; 2 s by default): with redis-py's 2 retries a
# stalled Redis costs a request at most ~3 timeouts, so a pause a little longer than that shows 503s.
SOCKET_TIMEOUT_S = 0.5
FAULT_SETTINGS = {**FUZZ_SETTINGS, "PREFIX_SERVE_PREFIX_RECONCILE_INTERVAL_S": str(RECONCILE_S)}
PROMPT = "The store went away and"


@dataclass
class Rig:
    """A Redis server, a prefix-serve server on it, and an admin key."""

    redis: RedisServer
    server: ServerProcess
    key: str

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout
        )


@contextmanager
def redis_rig(model_dir: Path | None = None) -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="hardening-redis-") as work:
        root = Path(work)
        redis = RedisServer(root / "redis")
        redis.start()
        try:
            keys = make_keys(root / "keys.json")
            env = {**FAULT_SETTINGS, "PREFIX_SERVE_API_KEYS": str(root / "keys.json")}
            store_url = f"{redis.url}?socket_timeout={SOCKET_TIMEOUT_S}"
            with ServerProcess(model_dir or ensure_demo_model(), store_url, env=env) as server:
                key = keys["admin"]
                assert key is not None
                yield Rig(redis, server, key)
        finally:
            redis.stop()


def _generate(client: httpx.Client, task_id: str) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = client.post(
            "/v1/generate", json={"task_id": task_id, "prompt": PROMPT, "max_new_tokens": 2}
        ).status_code
    except httpx.TransportError:
        status = 0
    return status, time.perf_counter() - started


def _upload(client: httpx.Client, task_id: str, blob: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = upload(client, task_id, blob).status_code
    except httpx.TransportError:
        status = 0
    return status, time.perf_counter() - started


def outage(rig: Rig, *, down_s: float = 3.0) -> dict[str, Any]:
    """Kill Redis under load, restart it, measure; see the module docstring."""
    geometry = model_geometry(rig.server.model_dir)
    cold = [f"cold-{i}" for i in range(64)]  # never asked for before the kill: not resident
    with rig.client() as client:
        for seed, task_id in enumerate(["hot", *cold]):
            assert upload(client, task_id, native_prefix(geometry, 4, seed=seed)).is_success
        assert _generate(client, "hot")[0] == 200  # resident from now on
    with rig.redis.client() as redis:
        redis.save()  # the restart brings the data back, as a production Redis with persistence would
    during: dict[str, Counter[int]] = {"hot": Counter(), "cold": Counter(), "upload": Counter()}
    slowest: dict[str, float] = {"hot": 0.0, "cold": 0.0, "upload": 0.0}
    stop, down = threading.Event(), threading.Event()

    def load(kind: str) -> None:
        blob = native_prefix(geometry, 4, seed=1000)
        if kind != "hot":
            down.wait()
        with rig.client() as client:
            for i in range(10**9):
                if stop.is_set():
                    return
                if kind == "upload":
                    status, seconds = _upload(client, "new", blob)
                else:
                    status, seconds = _generate(client, "hot" if kind == "hot" else cold[i % len(cold)])
                during[kind][status] += 1
                slowest[kind] = max(slowest[kind], seconds)

    with ThreadPoolExecutor(3) as pool:
        for kind in during:
            pool.submit(load, kind)
        time.sleep(0.5)
        rig.redis.kill()  # SIGKILL, mid-load
        down.set()
        time.sleep(down_s)
        with rig.client() as client:
            ready_while_down = client.get("/readyz").status_code
        stop.set()
    counted = {kind: Counter(statuses) for kind, statuses in during.items()}
    rig.redis.start()  # same port, same data
    redis_back = time.perf_counter()
    with rig.client() as client:
        while _generate(client, "cold-0")[0] != 200 and time.perf_counter() - redis_back < 30:
            time.sleep(0.02)
        recovery_s = time.perf_counter() - redis_back
        ready_after = client.get("/readyz").status_code
    allowed = {"hot": {200}, "cold": {503}, "upload": {503}}
    return {
        "down_s": down_s,
        "statuses_during": {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in counted.items()},
        "slowest_s": {kind: round(s, 2) for kind, s in slowest.items()},
        "readyz_while_down": ready_while_down,
        "readyz_after": ready_after,
        "recovery_s": round(recovery_s, 2),
        "passed": (
            all(counted[kind] and set(counted[kind]) <= allowed[kind] for kind in counted)
            and ready_while_down == 503
            and ready_after == 200
            and recovery_s <= 10.0
        ),
    }


def pubsub_killed(rig: Rig) -> dict[str, Any]:
    """Lose a change event by killing pub/sub; measure convergence; see the module docstring."""
    geometry = model_geometry(rig.server.model_dir)
    other_replica = open_store(rig.redis.url)
    try:
        with rig.client() as client:
            assert upload(client, "swap", native_prefix(geometry, 4, seed=10)).is_success
            assert _generate(client, "swap")[0] == 200  # v1 resident on the server
            blob = native_prefix(geometry, 4, seed=11)
            stop = threading.Event()

            def kill_pubsub() -> None:
                with rig.redis.client() as redis:
                    while not stop.is_set():
                        redis.client_kill_filter(_type="pubsub")
                        time.sleep(0.005)

            killer = threading.Thread(target=kill_pubsub)
            killer.start()
            time.sleep(0.2)
            record, _ = other_replica.put(TENANT, "swap", blob, num_virtual_tokens=4, source_format="native")
            written = time.perf_counter()
            time.sleep(0.3)
            stop.set()
            killer.join()
            feed_back_s = _wait(lambda: _pubsub_clients(rig) >= 1, 10.0)
            converged_s = _wait(lambda: _resident(client, "swap", record.version), 10.0, since=written)
            served = client.post(
                "/v1/generate", json={"task_id": "swap", "prompt": PROMPT, "max_new_tokens": 2}
            ).json()
    finally:
        other_replica.close()
    return {
        "reconcile_interval_s": RECONCILE_S,
        "new_version_resident_after_s": round(converged_s, 2),
        "feed_resubscribed_after_s": round(feed_back_s, 2),
        "serves_new_version": served.get("prefix_version") == record.version,
        "passed": converged_s <= RECONCILE_S + 1.0 and served.get("prefix_version") == record.version,
    }


def paused(rig: Rig, *, pause_s: float = 3.0, clients: int = 40) -> dict[str, Any]:
    """``CLIENT PAUSE`` under a burst; see the module docstring."""
    geometry = model_geometry(rig.server.model_dir)
    cold = [f"paused-{i}" for i in range(clients // 2)]
    with rig.client() as client:
        assert upload(client, "hot", native_prefix(geometry, 4, seed=1)).is_success
        assert _generate(client, "hot")[0] == 200
        for i, task_id in enumerate(cold):
            assert upload(client, task_id, native_prefix(geometry, 2, seed=100 + i)).is_success
    blob = native_prefix(geometry, 2, seed=99)
    with rig.redis.client() as redis:
        redis.execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
    paused_at = time.perf_counter()

    def one(i: int) -> tuple[str, int, float]:
        with rig.client(timeout=60) as client:
            if i < len(cold):
                return ("cold", *_generate(client, cold[i]))
            if i < len(cold) + clients // 4:
                return ("upload", *_upload(client, f"paused-new-{i}", blob))
            return ("hot", *_generate(client, "hot"))

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(clients)))
    burst_s = time.perf_counter() - paused_at
    time.sleep(max(0.0, pause_s - (time.perf_counter() - paused_at)) + 0.1)
    with ThreadPoolExecutor(64) as pool:  # right after the pause: a pool left exhausted would show here
        after = list(pool.map(lambda i: one(i % clients), range(64)))
    statuses = {kind: Counter(s for k, s, _ in outcomes if k == kind) for kind in ("cold", "upload", "hot")}
    slowest = {kind: max((t for k, _, t in outcomes if k == kind), default=0.0) for kind in statuses}
    after_statuses = Counter(s for _, s, _ in after)
    return {
        "pause_s": pause_s,
        "clients": clients,
        "statuses_during": {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in statuses.items()},
        "slowest_s": {kind: round(s, 2) for kind, s in slowest.items()},
        "burst_s": round(burst_s, 2),
        "statuses_after": {str(k): v for k, v in sorted(after_statuses.items())},
        "passed": (
            set(statuses["cold"]) <= {200, 503}
            and set(statuses["upload"]) <= {200, 201, 503}
            and set(statuses["hot"]) == {200}
            and max(slowest.values()) <= pause_s + 5.0
            and set(after_statuses) <= {200, 201}
        ),
    }


def _wait(condition: Any, timeout_s: float, since: float | None = None) -> float:
    """Seconds (from ``since``, default now) until ``condition()`` holds; ``inf`` past the timeout."""
    started = since if since is not None else time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout_s:
            return float("inf")
        time.sleep(0.02)
    return time.perf_counter() - started


def _pubsub_clients(rig: Rig) -> int:
    with rig.redis.client() as redis:
        return len(redis.client_list(_type="pubsub"))


def _resident(client: httpx.Client, task_id: str, version: str) -> bool:
    info = client.get(f"/v1/admin/prefixes/{task_id}").json()
    return info.get("version") == version and info.get("resident") is True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("hardening/results/redis_faults.json"))
    args = parser.parse_args()
    with redis_rig() as rig:
        result = {"outage": outage(rig), "pubsub_killed": pubsub_killed(rig), "paused": paused(rig)}
    result["passed"] = all(part["passed"] for part in result.values())
    o, p, c = result["outage"], result["pubsub_killed"], result["paused"]
    print(
        f"Redis killed for {o['down_s']} s under load: resident prefix {o['statuses_during']['hot']}, cold "
        f"{o['statuses_during']['cold']} (slowest {o['slowest_s']['cold']} s); serving again {o['recovery_s']} s after "
        f"Redis came back.\npub/sub killed: new version resident after {p['new_version_resident_after_s']} s "
        f"(reconcile every {p['reconcile_interval_s']} s).\nCLIENT PAUSE {c['pause_s']} s under {c['clients']} "
        f"clients: {c['statuses_during']}, slowest {max(c['slowest_s'].values())} s; after: {c['statuses_after']}."
        f"\npassed: {result['passed']}"
    )
    write_result(args.out, result)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
