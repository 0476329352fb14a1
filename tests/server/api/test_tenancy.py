"""``TenantGate`` with a fake clock: the token bucket starts full, refills at ``requests_per_minute / 60``
per second up to its size, and its refusals carry ``Retry-After`` in whole seconds (at least 1) until one
more request is allowed; the concurrency limit refuses with ``Retry-After: 1`` and takes no rate token;
a release never takes the in-flight count below zero (an extra release grants no extra slot); tenants do not
share limits; and admits and releases from many threads at once keep the in-flight count exact."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.api.auth import AuthConfig, TenantLimits
from server.api.errors import ApiError
from server.api.tenancy import TenantGate


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _gate(clock: FakeClock, **tenants: TenantLimits) -> TenantGate:
    unlimited = TenantLimits(requests_per_minute=None, max_concurrent=None)
    return TenantGate(AuthConfig(tenant_limits=dict(tenants), default_limits=unlimited), clock=clock)


def _refusal(gate: TenantGate, tenant: str) -> ApiError:
    with pytest.raises(ApiError) as refused:
        gate.admit(tenant)
    error = refused.value
    assert (error.status, error.error_type) == (429, "rate_limited")
    return error


def _retry_after(gate: TenantGate, tenant: str) -> int:
    error = _refusal(gate, tenant)
    assert error.headers is not None
    return int(error.headers["Retry-After"])


def _admit_and_release(gate: TenantGate, tenant: str) -> None:
    gate.admit(tenant)
    gate.release(tenant)


def test_the_bucket_starts_full_and_refills_at_its_rate_up_to_its_size() -> None:
    clock = FakeClock()
    # 15 a minute: one every 4 s (a quarter a second, exact in binary: no rounding at the boundaries)
    gate = _gate(clock, acme=TenantLimits(requests_per_minute=15, max_concurrent=None))
    for _ in range(15):
        _admit_and_release(gate, "acme")
    assert _retry_after(gate, "acme") == 4  # empty: the next request is allowed in 4 s
    clock.advance(1)
    assert _retry_after(gate, "acme") == 3  # a quarter of a request refilled: 3 s to go
    clock.advance(3)
    _admit_and_release(gate, "acme")  # exactly one refilled
    assert _retry_after(gate, "acme") == 4
    clock.advance(3600)  # an hour idle refills the bucket to its size, no further
    for _ in range(15):
        _admit_and_release(gate, "acme")
    _refusal(gate, "acme")


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    clock = FakeClock()
    gate = _gate(
        clock,
        fast=TenantLimits(requests_per_minute=600, max_concurrent=None),  # one per 0.1 s
        odd=TenantLimits(requests_per_minute=7, max_concurrent=None),  # one per 8.57 s
    )
    for _ in range(600):
        _admit_and_release(gate, "fast")
    assert _retry_after(gate, "fast") == 1  # 0.1 s to wait is still "1"
    for _ in range(7):
        _admit_and_release(gate, "odd")
    assert _retry_after(gate, "odd") == 9  # 8.57 s, rounded up: never sooner than allowed
    clock.advance(8.5)
    assert _retry_after(gate, "odd") == 1  # 0.07 s left
    clock.advance(0.1)
    _admit_and_release(gate, "odd")


def test_the_concurrency_limit_refuses_with_retry_after_one_and_takes_no_rate_token() -> None:
    clock = FakeClock()
    gate = _gate(clock, acme=TenantLimits(requests_per_minute=2, max_concurrent=1))
    gate.admit("acme")
    for _ in range(5):
        refused = _refusal(gate, "acme")
        assert refused.headers == {"Retry-After": "1"} and "1 requests in flight" in refused.message
    gate.release("acme")
    gate.admit("acme")  # the five refusals did not drain the bucket: its second request is allowed
    gate.release("acme")
    assert "requests per minute" in _refusal(gate, "acme").message  # now the bucket is empty
    assert gate.in_flight("acme") == 0


def test_a_release_never_goes_below_zero_or_grants_an_extra_slot() -> None:
    gate = _gate(FakeClock(), acme=TenantLimits(requests_per_minute=None, max_concurrent=2))
    gate.release("acme")  # never admitted: nothing to give back
    gate.release("nobody")
    assert gate.in_flight("acme") == 0 and gate.in_flight("nobody") == 0
    gate.admit("acme")
    for _ in range(3):  # one request released three times
        gate.release("acme")
    assert gate.in_flight("acme") == 0
    gate.admit("acme")
    gate.admit("acme")
    _refusal(gate, "acme")  # still two, not two plus the extra releases
    assert gate.in_flight("acme") == 2


def test_tenants_have_their_own_limits_and_none_is_no_limit() -> None:
    clock = FakeClock()
    gate = _gate(
        clock,
        small=TenantLimits(requests_per_minute=1, max_concurrent=1),
        free=TenantLimits(requests_per_minute=None, max_concurrent=None),
    )
    gate.admit("small")
    _refusal(gate, "small")
    for _ in range(1000):  # neither small's state nor any limit touches them
        gate.admit("free")
        gate.admit("default")  # no entry: the defaults (no limits here)
    assert (gate.in_flight("small"), gate.in_flight("free"), gate.in_flight("default")) == (1, 1000, 1000)


def test_concurrent_admits_take_exactly_the_limit() -> None:
    """16 threads admit at once against a limit of 5: exactly 5 get in, 11 are refused."""
    gate = _gate(FakeClock(), acme=TenantLimits(requests_per_minute=None, max_concurrent=5))
    start = threading.Barrier(16)

    def admit(_: int) -> bool:
        start.wait()
        try:
            gate.admit("acme")
        except ApiError:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(admit, range(16)))
    assert outcomes.count(True) == 5 and gate.in_flight("acme") == 5


def test_admits_and_releases_from_threads_keep_the_count_exact() -> None:
    """Threads admit and release over and over against a limit of 3; the requests in flight, counted by
    the test as well, never exceed it, and at the end none is left."""
    gate = _gate(FakeClock(), acme=TenantLimits(requests_per_minute=None, max_concurrent=3))
    inside, most = 0, 0
    lock = threading.Lock()
    admitted = [0] * 8

    def work(worker: int) -> None:
        nonlocal inside, most
        for _ in range(2000):
            try:
                gate.admit("acme")
            except ApiError:
                continue
            with lock:
                inside += 1
                most = max(most, inside)
            admitted[worker] += 1
            with lock:
                inside -= 1
            gate.release("acme")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert gate.in_flight("acme") == 0 and 1 <= most <= 3
    assert sum(admitted) > 0
    for _ in range(3):  # all three slots are free again
        gate.admit("acme")
    _refusal(gate, "acme")
