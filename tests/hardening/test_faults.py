"""Faults without Redis: streaming clients leaving mid-stream, and ``kill -9`` right after an
acknowledged upload. ``python -m hardening.disconnects`` and ``… crash_uploads`` run more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hardening import crash_uploads, disconnects
from hardening.common import hardening_server
from tests.hardening.conftest import Hardened

pytestmark = pytest.mark.e2e  # starts servers or other processes

CRASH_TRIALS = 2  # each one a SIGKILL and a restart; the script runs 20 and more


@pytest.fixture(scope="module")
def fault_server(demo_model_dir: Path) -> Iterator[Hardened]:
    with hardening_server({"PREFIX_SERVE_MAX_NEW_TOKENS": "1024"}, model_dir=demo_model_dir) as (
        server,
        keys,
        store,
    ):
        yield Hardened(server, keys, store)


def test_fifty_streaming_clients_leaving_mid_stream_free_rows_queue_and_pins(fault_server: Hardened) -> None:
    result = disconnects.run(fault_server.server, fault_server.admin_key, clients=50, rounds=1)
    (round_,) = result["rounds"]
    assert round_["statuses"] == {"200": 50}
    assert round_["aborted"] >= 25, round_  # most were cut mid-stream (a few may meet EOS first)
    assert round_["while_connected"]["prefix_serve_pinned_requests"] >= 25, round_
    assert not any(round_["gauges"].values()), round_  # all back to zero
    assert round_["seconds_to_zero"] < 10 and round_["served_after"]


def test_kill_9_after_an_acknowledged_upload_loses_nothing(fault_server: Hardened) -> None:
    report = crash_uploads.run(fault_server.server, fault_server.admin_key, trials=CRASH_TRIALS)
    assert report.trials == CRASH_TRIALS and report.acknowledged >= CRASH_TRIALS
    assert report.lost == [] and report.torn == [], report.to_json()
