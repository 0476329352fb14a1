"""``prefix-serve bench --url`` against real ``prefix-serve serve`` processes on the demo model: prompt
lengths in the server's tokens, the number of requests per point, the base model, 429s, refusals."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.api.auth import Role, create_key
from server.benchmark.models import random_prefixes
from server.benchmark.remote_prompts import PROBE_REPEATS
from server.cli import main
from server.engine.base_model import load_base_model
from testing.ports import free_port
from testing.server_process import ServerProcess

pytestmark = pytest.mark.e2e  # starts servers or other processes

TASK = "remote-task"
GENERATE = {"method": "POST", "route": "/v1/generate"}
ACQUIRES = ("hits", "misses", "coalesced")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[ServerProcess]:
    """A server with the defaults (auth off) and one task of the default tenant."""
    base = load_base_model(str(demo_model_dir))
    (prefix,) = random_prefixes(base, [6], seed=5)
    store = (tmp_path_factory.mktemp("remote") / "store").as_uri()
    with ServerProcess(demo_model_dir, store) as running:
        blob = encode_native(prefix, base.geometry)
        httpx.put(f"{running.url}/v1/admin/prefixes/{TASK}", files={"file": ("p", blob)}).raise_for_status()
        yield running


TENANT_LIMITS = {
    "serial": {"max_concurrent": 1},  # a second request in flight is answered 429, Retry-After 1
    "steady": {"requests_per_minute": 60},  # a burst of 60, then one a second (Retry-After 1)
    "some": {"requests_per_minute": 9},  # calibration (5) and warm-up (2), then 2 more in a burst
    "setup-only": {"requests_per_minute": 7},  # calibration and warm-up, then nothing for 8 s
    "spent": {"requests_per_minute": 1},  # spent before the bench starts
}


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """A server with auth on and tenants of low limits (the keys file's ``tenants``), with their keys."""
    folder = tmp_path_factory.mktemp("limited")
    keys_file = folder / "keys.json"
    keys = {tenant: create_key(keys_file, tenant, Role.USER) for tenant in TENANT_LIMITS}
    data = json.loads(keys_file.read_text())
    keys_file.write_text(json.dumps({**data, "tenants": TENANT_LIMITS}))
    env = {"PREFIX_SERVE_API_KEYS": str(keys_file)}
    with ServerProcess(demo_model_dir, (folder / "store").as_uri(), env=env) as running:
        yield running, keys


def _bench(url: str, out: Path, *options: str) -> int:
    argv = ["bench", "--url", url, "--sections", "concurrency", "--repeats", "1", "--new-tokens", "2"]
    return main([*argv, *options, "--out", str(out)])


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _served(server: ServerProcess, status: int = 200) -> float:
    return server.counter("prefix_serve_http_requests_total", **GENERATE, status=str(status))


def _acquires(server: ServerProcess) -> float:
    gauges = server.gauges()
    return sum(gauges.get(f"prefix_serve_prefix_cache_{name}_total", 0.0) for name in ACQUIRES)


def _requests_sent(report: dict[str, Any]) -> int:
    """Every generate request the bench had answered: calibration, warm-up and the points'."""
    points = report["curves"]["concurrency"]
    return report["calibration"]["probes"] + report["warm_up_requests"] + sum(p["requests"] for p in points)


def _calibration_tokens(calibration: dict[str, Any]) -> int:
    """The prompt tokens of the calibration probes, as the server counted them."""
    offset, words = calibration["offset"], calibration["word_tokens"]
    first = next(iter(words))
    return offset + words[first] + sum(offset + PROBE_REPEATS * n for n in words.values())


def test_prompt_lengths_are_the_servers_tokens(server: ServerProcess, tmp_path: Path) -> None:
    before = server.gauges()["prefix_serve_prompt_tokens_total"]
    assert (
        _bench(
            server.url, tmp_path, "--concurrency-curve", "1,2", "--requests", "16", "--prompt-tokens", "20-40"
        )
        == 0
    )
    counted = server.gauges()["prefix_serve_prompt_tokens_total"] - before
    report = _report(tmp_path)
    points = report["curves"]["concurrency"]
    assert all(20 <= p["prompt_tokens_min"] <= p["prompt_tokens_max"] <= 40 for p in points)
    assert report["prompt_tokens"]["requested"] == [20, 40]
    low, high = report["prompt_tokens"]["measured"]
    assert 20 <= low < 25 and 35 < high <= 40  # the whole range, not one length
    # the server's own count of every prompt: the probes', then the rest all within 20-40
    measured = counted - _calibration_tokens(report["calibration"])
    requests = report["warm_up_requests"] + sum(p["requests"] for p in points)
    assert 20 * requests <= measured <= 40 * requests
    mean = sum(p["prompt_tokens_mean"] * p["requests"] for p in points) / sum(p["requests"] for p in points)
    assert 20 <= mean <= 40


def test_each_point_sends_the_requests_asked_for(server: ServerProcess, tmp_path: Path) -> None:
    served = _served(server)
    assert (
        _bench(server.url, tmp_path, "--concurrency-curve", "1,3", "--requests", "12", "--repeats", "2") == 0
    )
    report = _report(tmp_path)
    points = report["curves"]["concurrency"]
    assert [(p["x"], p["requests"]) for p in points] == [(1, 12), (3, 12)]
    assert report["remote"]["requests_per_point"] == {"1": 12, "3": 12}
    # the median run of each point is reported; both repeats ran: the server counts all of them
    probes, warm_up = report["calibration"]["probes"], report["warm_up_requests"]
    assert _served(server) - served == probes + warm_up + 2 * (12 + 12)


def test_a_point_runs_at_least_min_seconds(server: ServerProcess, tmp_path: Path) -> None:
    served = _served(server)
    assert (
        _bench(server.url, tmp_path, "--concurrency-curve", "2", "--requests", "2", "--min-seconds", "1.5")
        == 0
    )
    report = _report(tmp_path)
    (point,) = report["curves"]["concurrency"]
    assert point["wall_s"] >= 1.5 and point["requests"] > 2
    assert _served(server) - served == _requests_sent(report)


def test_the_base_model_is_measured_even_when_the_tenant_has_tasks(
    server: ServerProcess, tmp_path: Path
) -> None:
    acquires = _acquires(server)
    assert _bench(server.url, tmp_path / "tasks", "--requests", "4", "--concurrency-curve", "1") == 0
    assert _report(tmp_path / "tasks")["tasks"] == [TASK]
    assert _acquires(server) > acquires  # the caller's task by default: its prefix is acquired

    acquires, served = _acquires(server), _served(server)
    assert (
        _bench(server.url, tmp_path / "base", "--base-model", "--requests", "4", "--concurrency-curve", "1")
        == 0
    )
    report = _report(tmp_path / "base")
    assert report["tasks"] == [] and report["base_model"] is True
    assert _served(server) - served == _requests_sent(report)
    assert _acquires(server) == acquires  # no request asked for a prefix

    options = ["--base-model", "--task-ids", TASK, "--requests", "4", "--concurrency-curve", "1"]
    assert _bench(server.url, tmp_path / "mix", *options) == 0
    report = _report(tmp_path / "mix")
    assert report["tasks"] == [TASK] and report["base_model"] is True
    assert _acquires(server) == acquires + 3  # every other request is on the task: 1 of 2 warm-up, 2 of 4


def test_429s_are_waited_out_and_counted(
    limited: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, keys = limited
    served, refused = _served(server), _served(server, 429)
    assert (
        _bench(
            server.url, tmp_path, "--api-key", keys["serial"], "--concurrency-curve", "3", "--requests", "6"
        )
        == 0
    )
    report = _report(tmp_path)
    (point,) = report["curves"]["concurrency"]
    assert point["requests"] == 6 and point["refused"] == 0 and point["rate_limited"] > 0
    assert _served(server, 429) - refused == report["rate_limited"] >= point["rate_limited"]
    assert _served(server) - served == _requests_sent(report)
    assert "429 answers" in (tmp_path / "report.md").read_text()


def test_a_rate_limit_is_waited_out_as_retry_after_says(
    limited: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, keys = limited
    refused = _served(server, 429)
    options = ["--api-key", keys["steady"], "--concurrency-curve", "1", "--requests", "60"]
    started = time.monotonic()
    assert _bench(server.url, tmp_path, *options, "--new-tokens", "1") == 0
    elapsed = time.monotonic() - started
    report = _report(tmp_path)
    (point,) = report["curves"]["concurrency"]
    assert point["requests"] == 60 and point["refused"] == 0
    # the bucket holds 60 and refills one a second: what was sent past it, less the refill while the run
    # went on, was refused (a fast machine: a few; a loaded one may have been slow enough for none)
    over_the_bucket = _requests_sent(report) - 60 - math.ceil(elapsed)
    assert point["rate_limited"] >= over_the_bucket
    assert _served(server, 429) - refused == report["rate_limited"] == point["rate_limited"]
    assert point["wall_s"] >= point["rate_limited"] * 1.0  # each 429 was waited out for its Retry-After


def test_requests_past_the_wait_budget_count_as_refused(
    limited: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, keys = limited
    refused = _served(server, 429)
    options = [
        "--api-key",
        keys["some"],
        "--concurrency-curve",
        "1",
        "--requests",
        "4",
        "--max-retry-wait",
        "2",
    ]
    assert _bench(server.url, tmp_path, *options) == 0
    report = _report(tmp_path)
    (point,) = report["curves"]["concurrency"]
    assert (point["requests"], point["refused"], point["rate_limited"]) == (2, 2, 2)
    assert report["refused"] == 2 and _served(server, 429) - refused == report["rate_limited"] == 2


@pytest.mark.parametrize(
    ("tenant", "what"),
    [("setup-only", "every request of the 1-client run"), ("spent", "a calibration request")],
)
def test_a_run_refused_throughout_is_one_line_naming_the_limit(
    limited: tuple[ServerProcess, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tenant: str,
    what: str,
) -> None:
    server, keys = limited
    headers = {"Authorization": f"Bearer {keys[tenant]}"}
    if tenant == "spent":
        body = {"prompt": "hello", "max_new_tokens": 1}
        httpx.post(f"{server.url}/v1/generate", json=body, headers=headers).raise_for_status()
    per_minute = TENANT_LIMITS[tenant]["requests_per_minute"]
    options = [
        "--api-key",
        keys[tenant],
        "--concurrency-curve",
        "1",
        "--requests",
        "2",
        "--max-retry-wait",
        "2",
    ]
    assert _bench(server.url, tmp_path / "out", *options) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "refused" in line]
    assert line.startswith(
        f"the server refused: {what} was refused: 429 tenant is over its limit of {per_minute} "
    )
    assert "Retry-After" in line and "--max-retry-wait of 2 s" in line
    assert not (tmp_path / "out").exists()


def test_a_server_limiting_the_local_tenant_is_refused_in_one_line(
    demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # auth off, `serve --tenant-requests-per-minute 5`: calibration spends the burst of 5
    env = {"PREFIX_SERVE_TENANT_REQUESTS_PER_MINUTE": "5"}
    with ServerProcess(demo_model_dir, (tmp_path / "store").as_uri(), env=env) as server:
        assert _bench(server.url, tmp_path / "out", "--max-retry-wait", "1") == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "refused" in line]
    assert line.startswith(
        "the server refused: every request of the warm-up was refused: "
        "429 tenant is over its limit of 5 requests per minute (Retry-After "
    )
    assert line.endswith("past the --max-retry-wait of 1 s")


def test_unusable_keys_tasks_and_urls_are_reported(
    limited: tuple[ServerProcess, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, keys = limited
    out = tmp_path / "out"
    assert _bench(server.url, out, "--api-key", "") == 1  # no key
    assert "GET /v1/models answered 401" in capsys.readouterr().out
    assert _bench(server.url, out, "--api-key", keys["serial"], "--task-ids", "no-such-task") == 1
    assert "POST /v1/generate answered 404" in capsys.readouterr().out
    assert _bench(f"http://127.0.0.1:{free_port()}", out) == 1
    assert "cannot reach" in capsys.readouterr().out
    assert not out.exists()  # nothing half-written


def test_remote_report_has_the_curve_and_its_plot(server: ServerProcess, tmp_path: Path) -> None:
    generated = server.gauges()["prefix_serve_generated_tokens_total"]
    assert (
        _bench(server.url, tmp_path, "--concurrency-curve", "1,2", "--requests", "4", "--new-tokens", "3")
        == 0
    )
    report = _report(tmp_path)
    assert report["mode"] == "remote" and report["url"] == server.url and "targets" not in report
    points = report["curves"]["concurrency"]
    assert [p["x"] for p in points] == [1, 2] and all(p["requests"] == 4 for p in points)
    measured = sum(p["tokens"] for p in points)
    assert (
        0 < measured <= 8 * 3
        and measured <= server.gauges()["prefix_serve_generated_tokens_total"] - generated
    )
    assert (tmp_path / "curve-concurrency.png").read_bytes()[:4] == b"\x89PNG"
