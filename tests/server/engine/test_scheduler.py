"""The scheduler with fakes: fairness across tenants and tasks, capacity, prefix readiness, deadlines, bounds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.lifecycle import RequestStatus
from server.engine.scheduler import QueueFull, RequestTooLarge, Scheduler, SchedulerConfig


@dataclass
class ScheduledRequest:
    """A fake of the engine's request record: only what the scheduler reads and sets."""

    request_id: str
    tenant: str
    task_id: str | None
    cost_tokens: int
    deadline: float | None
    status: RequestStatus = RequestStatus.WAITING_FOR_PREFIX
    shared_key: str | None = None
    shared_tokens: int = 0


def _request(
    request_id: str, tenant: str, task_id: str | None = "t", cost: int = 100, deadline: float | None = None
):
    return ScheduledRequest(request_id, tenant, task_id, cost, deadline, status=RequestStatus.WAITING)


def _run_rounds(scheduler: Scheduler, rounds: int, finish_admitted: bool = True) -> list[list[str]]:
    """Schedule ``rounds`` steps; each step's admitted requests finish before the next (a busy server)."""
    history = []
    for step in range(rounds):
        admitted = scheduler.schedule(now=float(step)).admitted
        history.append(admitted)
        if finish_admitted:
            for request_id in admitted:
                scheduler.finish(request_id)
    return history


def test_a_flooding_tenant_does_not_starve_another() -> None:
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=4, max_batch_tokens=10_000, max_waiting=1000, quantum_tokens=200)
    )
    for i in range(100):
        scheduler.add(_request(f"a{i}", "A"))
    for i in range(5):
        scheduler.add(_request(f"b{i}", "B"))
    history = _run_rounds(scheduler, 6)
    order = [rid for step in history for rid in step]
    assert all(f"b{i}" in order for i in range(5))
    assert max(order.index(f"b{i}") for i in range(5)) < 24  # B's five are in within 6 rounds of 4 slots
    assert history[0] == ["a0", "a1", "b0", "b1"]  # turns alternate after each tenant's quantum (2 requests)


def test_fairness_is_in_tokens_not_requests() -> None:
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=1000, max_batch_tokens=1000, max_waiting=1000, quantum_tokens=100)
    )
    for i in range(50):
        scheduler.add(_request(f"big{i}", "big", cost=200))
        scheduler.add(_request(f"small{i}", "small", cost=20))
    admitted = scheduler.schedule(now=0).admitted
    tokens = {"big": 0, "small": 0}
    for request_id in admitted:
        tokens["big" if request_id.startswith("big") else "small"] += (
            200 if request_id.startswith("big") else 20
        )
    assert sum(tokens.values()) <= 1000
    assert abs(tokens["big"] - tokens["small"]) <= 200  # each tenant got about half of the token budget


def test_tasks_of_one_tenant_take_turns() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=6, max_waiting=100, quantum_tokens=10_000))
    for i in range(4):
        scheduler.add(_request(f"x{i}", "A", task_id="x"))
    for i in range(2):
        scheduler.add(_request(f"y{i}", "A", task_id="y"))
    scheduler.add(_request("base0", "A", task_id=None))
    assert scheduler.schedule(now=0).admitted == ["x0", "y0", "base0", "x1", "y1", "x2"]


def test_capacity_bounds_rows_and_tokens() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=250, max_waiting=100))
    for i in range(5):
        scheduler.add(_request(f"r{i}", "A", cost=100))
    assert scheduler.schedule(now=0).admitted == ["r0", "r1"]  # a third would need 300 tokens
    assert scheduler.num_running == 2 and scheduler.num_waiting == 3
    scheduler.finish("r0")
    assert scheduler.schedule(now=1).admitted == ["r2"]
    with pytest.raises(RequestTooLarge, match="over the batch budget of 250"):
        scheduler.add(_request("huge", "A", cost=251))


def test_requests_wait_for_their_prefix() -> None:
    scheduler = Scheduler(SchedulerConfig())
    scheduler.add(ScheduledRequest("cold", "A", "t", 10, None))  # WAITING_FOR_PREFIX by default
    scheduler.add(_request("warm", "A", task_id="u"))
    assert scheduler.schedule(now=0).admitted == ["warm"]
    assert scheduler.get("cold").status is RequestStatus.WAITING_FOR_PREFIX
    assert scheduler.schedule(now=1).admitted == []
    scheduler.prefix_ready("cold", prefix_tokens=20)
    assert scheduler.schedule(now=2).admitted == ["cold"]
    assert scheduler.get("cold").status is RequestStatus.RUNNING


def test_deadlines_and_aborts_are_reported_once() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=1))
    scheduler.add(_request("running", "A", deadline=10.0))
    assert scheduler.schedule(now=0).admitted == ["running"]
    scheduler.add(_request("waiting", "A", deadline=5.0))
    scheduler.add(_request("gone", "A"))
    scheduler.abort("gone")
    decision = scheduler.schedule(now=6.0)
    assert (decision.admitted, decision.expired, decision.aborted) == ([], ["waiting"], ["gone"])
    scheduler.finish("waiting")
    scheduler.finish("gone")
    assert scheduler.schedule(now=11.0).expired == ["running"]
    scheduler.finish("running")
    assert scheduler.schedule(now=12.0) == scheduler.schedule(now=13.0)
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)


def test_the_queue_is_bounded() -> None:
    scheduler = Scheduler(SchedulerConfig(max_waiting=3))
    for i in range(3):
        scheduler.add(_request(f"r{i}", "A"))
    with pytest.raises(QueueFull) as refused:
        scheduler.add(_request("r3", "B"))
    assert refused.value.retry_after > 0
    scheduler.schedule(now=0)  # admitted requests no longer count as waiting
    scheduler.add(_request("r3", "B"))


def test_nothing_is_left_behind() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, max_waiting=2000))
    for i in range(1000):
        scheduler.add(_request(f"r{i}", f"tenant{i % 7}", task_id=f"task{i % 13}"))
    while scheduler.num_waiting:
        for request_id in scheduler.schedule(now=0).admitted:
            scheduler.finish(request_id)
    assert scheduler._requests == {} and len(scheduler._tenants) == 0


def test_rows_sharing_a_prefix_reserve_it_once() -> None:
    """Rows of one tenant on one prefix content reserve its tokens once: four rows of a 300-token prefix
    and 100 tokens each fit a 700-token budget (1,600 if each paid for the prefix); another tenant's or
    another content's rows pay again; the prefix's tokens are given back with its last row."""
    scheduler = Scheduler(SchedulerConfig(max_batch_size=16, max_batch_tokens=700, quantum_tokens=10_000))

    def on_prefix(request_id: str, key: str) -> ScheduledRequest:
        request = _request(request_id, key.split("|")[0], cost=100)
        request.status = RequestStatus.WAITING_FOR_PREFIX
        scheduler.add(request)
        scheduler.prefix_ready(request_id, 300, key)
        return request

    rows = [on_prefix(f"r{i}", "acme|sha:1") for i in range(4)]
    assert scheduler.schedule(now=0).admitted == ["r0", "r1", "r2", "r3"]  # 300 + 4 x 100
    on_prefix("other-content", "acme|sha:2")
    on_prefix("other-tenant", "globex|sha:1")
    assert scheduler.schedule(now=1).admitted == []  # each would reserve 400 more
    for row in rows[:3]:
        scheduler.finish(row.request_id)
    assert scheduler.schedule(now=2).admitted == []  # 300 + 100 held by the last row: 400 + 400 > 700
    scheduler.finish("r3")
    assert scheduler.schedule(now=3).admitted == ["other-content"]  # the shared 300 went with the last row
    scheduler.finish("other-content")
    assert scheduler.schedule(now=4).admitted == ["other-tenant"]
    scheduler.finish("other-tenant")
    assert scheduler._running_tokens == 0
