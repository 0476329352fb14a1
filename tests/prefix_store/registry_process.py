"""A second replica for the cross-process tests: a registry over a shared Redis, driven line by line.

``python -m tests.prefix_store.registry_process URL RECONCILE_S`` (seconds, or ``none``: no periodic
reconcile, only the feed and the reconcile each subscription runs); commands on stdin, one JSON answer per
line on stdout: ``acquire TENANT TASK`` (acquire and release: ``{"version"}`` or ``{"error"}``),
``resident TENANT TASK`` (``{"version"}`` or null), ``stats``, ``quit``.
"""

from __future__ import annotations

import json
import sys

import torch

from prefix_store.cache.registry import PrefixRegistry
from prefix_store.errors import PrefixStoreError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.storage.store import open_store
from tests.prefix_store.conftest import GEOMETRY


def main(url: str, reconcile_s: float | None) -> None:
    store = open_store(url)
    registry = PrefixRegistry(
        store,
        GEOMETRY,
        device="cpu",
        dtype=torch.float32,
        limits=PrefixLimits(),
        reconcile_interval_s=reconcile_s,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        answer: object
        if command == "acquire":
            try:
                with registry.pinned(args[0], args[1]) as handle:
                    answer = {"version": handle.record.version}
            except PrefixStoreError as exc:
                answer = {"error": type(exc).__name__}
        elif command == "resident":
            answer = {"version": registry.resident_version(args[0], args[1])}
        elif command == "stats":
            answer = {k: v for k, v in registry.stats().__dict__.items() if isinstance(v, int | bool)}
        else:
            break
        print(json.dumps(answer), flush=True)
    registry.close()
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], None if sys.argv[2] == "none" else float(sys.argv[2]))
