"""Per-tenant admission limits: requests per minute (a token bucket) and requests in flight; a limit
of None is not enforced."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.api.auth import AuthConfig
from server.api.errors import ApiError


@dataclass
class _TenantState:
    tokens: float  # requests the bucket allows right now
    refilled_at: float
    in_flight: int = 0


class TenantGate:
    """Admits a tenant's requests within its limits; every admitted request must be released once."""

    def __init__(self, auth: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._auth = auth
        self._clock = clock
        self._states: dict[str, _TenantState] = {}
        self._lock = threading.Lock()

    def admit(self, tenant: str) -> None:
        """Take one request slot for ``tenant`` or raise a 429 ``ApiError`` with ``Retry-After``."""
        limits = self._auth.limits_for(tenant)
        per_minute = limits.requests_per_minute
        with self._lock:
            now = self._clock()
            state = self._states.setdefault(tenant, _TenantState(float(per_minute or 0), now))
            if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
                raise _too_many(
                    f"tenant has {state.in_flight} requests in flight, the limit is {limits.max_concurrent}",
                    1,
                )
            if per_minute is not None:
                rate = per_minute / 60.0  # bucket refill per second
                state.tokens = min(float(per_minute), state.tokens + (now - state.refilled_at) * rate)
                state.refilled_at = now
                if state.tokens < 1.0:
                    wait = (1.0 - state.tokens) / rate
                    raise _too_many(f"tenant is over its limit of {per_minute} requests per minute", wait)
                state.tokens -= 1.0
            state.in_flight += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            state = self._states.get(tenant)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            state = self._states.get(tenant)
            return state.in_flight if state else 0


def _too_many(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        429, "rate_limited", message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    )
