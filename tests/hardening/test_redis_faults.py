"""Redis faults against a server on the Redis store (a real ``redis-server`` on a free port): killed
under load and restarted, pub/sub connections killed, ``CLIENT PAUSE``.
``python -m hardening.redis_faults`` runs the same and writes the figures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hardening import redis_faults
from hardening.redis_faults import Rig

pytestmark = pytest.mark.e2e  # starts servers or other processes


@pytest.fixture(scope="module")
def rig(demo_model_dir: Path) -> Iterator[Rig]:
    with redis_faults.redis_rig(demo_model_dir) as rig:
        yield rig


def test_redis_killed_under_load_then_restarted(rig: Rig) -> None:
    result = redis_faults.outage(rig, down_s=2.0)
    during = result["statuses_during"]
    assert set(during["hot"]) == {"200"}, result  # resident prefixes keep serving
    assert set(during["cold"]) == {"503"} and set(during["upload"]) == {"503"}, result
    assert max(result["slowest_s"].values()) < 3.0, result  # cold loads and uploads fail fast
    assert result["readyz_while_down"] == 503 and result["readyz_after"] == 200
    assert result["recovery_s"] <= 10.0, result  # without restarting the server
    assert result["passed"]


def test_lost_pubsub_events_converge_within_the_reconcile_interval(rig: Rig) -> None:
    result = redis_faults.pubsub_killed(rig)
    assert result["serves_new_version"], result
    assert result["new_version_resident_after_s"] <= redis_faults.RECONCILE_S + 1.0, result
    assert result["passed"]


def test_a_paused_redis_gives_bounded_503s_and_leaves_the_pool_usable(rig: Rig) -> None:
    result = redis_faults.paused(rig, pause_s=4.0, clients=40)  # retries end well inside: 503s are sure
    during = result["statuses_during"]
    assert set(during["hot"]) == {"200"}, result
    assert set(during["cold"]) <= {"200", "503"} and "503" in during["cold"], result
    assert max(result["slowest_s"].values()) <= 4.0 + 5.0, result
    assert set(result["statuses_after"]) <= {"200", "201"}, result
    assert result["passed"]
