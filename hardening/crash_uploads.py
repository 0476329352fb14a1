"""``kill -9`` right after an acknowledged upload: nothing acknowledged is lost, nothing is torn.

    python -m hardening.crash_uploads --trials 20 --out hardening/results/crash_uploads.json

Each trial starts uploads of several new tasks and a replacement of an existing one at once, and
SIGKILLs the server the moment the first 2xx arrives (others are still in flight). After a restart on
the same store: every acknowledged upload is there with the acknowledged sha256, its download hashes to
it and it serves; every upload still in flight at the kill is either absent (or, for the replacement,
the old version) or complete, never torn; and the tenant's usage (what its quota is checked against)
equals the count and bytes of the records that are there.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hardening.common import hardening_server, write_result
from hardening.prefixes import model_geometry, native_prefix, upload
from testing.server_process import ServerProcess

STABLE = "stable"  # an existing task each trial replaces
UPLOADS_PER_TRIAL = 4  # new tasks per trial, besides the replacement


@dataclass
class CrashReport:
    trials: int = 0
    acknowledged: int = 0  # uploads answered 2xx before the kill
    in_flight: int = 0  # uploads without an answer at the kill
    in_flight_landed: int = 0  # of those, the ones present (complete) after the restart
    lost: list[str] = field(default_factory=list)  # acknowledged uploads missing or changed: must be empty
    torn: list[str] = field(default_factory=list)  # present but inconsistent: must be empty
    restart_s: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.trials > 0 and self.acknowledged > 0 and not self.lost and not self.torn

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": self.trials,
            "acknowledged_uploads": self.acknowledged,
            "acknowledged_lost": len(self.lost),
            "in_flight_at_kill": self.in_flight,
            "in_flight_landed_complete": self.in_flight_landed,
            "torn": len(self.torn),
            "problems": self.lost + self.torn,
            "mean_restart_s": round(sum(self.restart_s) / max(1, len(self.restart_s)), 1),
            "passed": self.passed,
        }


@contextmanager
def admin_client(server: ServerProcess, key: str | None) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


def run_trial(server: ServerProcess, key: str | None, trial: int, report: CrashReport) -> None:
    """One trial on a running server: uploads, SIGKILL at the first ack, restart, check."""
    geometry = model_geometry(server.model_dir)
    blobs = {
        f"crash-{trial}-{i}": native_prefix(geometry, 2 + i, seed=1000 * trial + i)
        for i in range(UPLOADS_PER_TRIAL)
    }
    blobs[STABLE] = native_prefix(geometry, 3, seed=1000 * trial + 99)
    with admin_client(server, key) as client:
        before = client.get(f"/v1/admin/prefixes/{STABLE}").json()
    acks: dict[str, tuple[float, dict[str, Any]]] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def put(task_id: str) -> None:
        with admin_client(server, key) as client:
            try:
                response = upload(client, task_id, blobs[task_id])
            except httpx.TransportError:
                return  # killed before it answered: in flight
            with lock:  # the first ack kills the server at once; no ack counts after the kill
                if response.is_success and not killed.is_set():
                    acks[task_id] = (time.perf_counter(), response.json())
                    server.kill9()
                    killed.set()

    with ThreadPoolExecutor(len(blobs)) as pool:
        for task_id in blobs:
            pool.submit(put, task_id)
    acknowledged = dict(acks)
    report.trials += 1
    report.acknowledged += len(acknowledged)
    if not killed.is_set():  # every upload failed: say so rather than pass
        raise RuntimeError(f"no upload was acknowledged in trial {trial}:\n{server.log_tail()}")
    started = time.perf_counter()
    server.start()
    report.restart_s.append(time.perf_counter() - started)
    with admin_client(server, key) as client:
        for task_id, blob in blobs.items():
            _check_task(
                client,
                task_id,
                blob,
                acknowledged.get(task_id),
                before if task_id == STABLE else None,
                report,
            )
        _check_usage(client, report)


def _check_usage(client: httpx.Client, report: CrashReport) -> None:
    """The usage the store kept through the kill matches the records a walk over the pages finds."""
    records, cursor = [], None
    while True:
        page = client.get("/v1/admin/prefixes", params={"cursor": cursor} if cursor else {}).json()
        records += page["prefixes"]
        if (cursor := page["next_cursor"]) is None:
            break
    counted = {"prefixes": len(records), "bytes": sum(record["bytes"] for record in records)}
    kept = {name: page["usage"][name] for name in counted}
    if kept != counted:
        report.torn.append(f"usage after the restart {kept}, the records {counted}")


def _check_task(
    client: httpx.Client,
    task_id: str,
    blob: bytes,
    ack: tuple[float, dict[str, Any]] | None,
    previous: dict[str, Any] | None,
    report: CrashReport,
) -> None:
    sent = hashlib.sha256(blob).hexdigest()
    record = client.get(f"/v1/admin/prefixes/{task_id}")
    if ack is not None:
        acked = ack[1]
        if (
            record.status_code != 200
            or record.json()["version"] != acked["version"]
            or acked["sha256"] != sent
        ):
            report.lost.append(
                f"{task_id}: acknowledged {acked['version']}, after the restart {record.text[:200]}"
            )
            return
    else:
        report.in_flight += 1
        if record.status_code == 404 or (
            previous is not None and record.json()["version"] == previous["version"]
        ):
            return  # never happened: fine for an upload nobody acknowledged
        if record.status_code != 200:
            report.torn.append(
                f"{task_id}: in flight at the kill, now {record.status_code} {record.text[:200]}"
            )
            return
        report.in_flight_landed += 1
    stored = client.get(f"/v1/admin/prefixes/{task_id}/download")
    if stored.status_code != 200 or hashlib.sha256(stored.content).hexdigest() != sent:
        report.torn.append(f"{task_id}: the stored bytes do not hash to what was sent")
        return
    generated = client.post(
        "/v1/generate", json={"task_id": task_id, "prompt": "after the crash", "max_new_tokens": 2}
    )
    if generated.status_code != 200:
        report.torn.append(
            f"{task_id}: present but does not serve: {generated.status_code} {generated.text[:200]}"
        )


def run(server: ServerProcess, key: str | None, trials: int) -> CrashReport:
    """``trials`` crash trials against ``server`` (started; left running on the same store)."""
    with admin_client(server, key) as client:
        assert upload(client, STABLE, native_prefix(model_geometry(server.model_dir), 3, seed=7)).is_success
    report = CrashReport()
    for trial in range(trials):
        run_trial(server, key, trial, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("hardening/results/crash_uploads.json"))
    args = parser.parse_args()
    with hardening_server() as (server, keys, _):
        report = run(server, keys["admin"], args.trials)
    result = report.to_json()
    print(
        f"{report.trials} kill -9 trials: {report.acknowledged} acknowledged uploads, {len(report.lost)} lost; "
        f"{report.in_flight} in flight at the kill ({report.in_flight_landed} landed complete), {len(report.torn)} torn"
    )
    for problem in report.lost + report.torn:
        print(f"  {problem}")
    write_result(args.out, result)
    raise SystemExit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
