"""When to retry a call and how long to wait first: decisions only, no I/O (the clients sleep).

Retried: connection errors, 429 answers that carry ``Retry-After`` (a rate limit or a full queue, not
a quota, which waiting does not lift) and 503. A ``Retry-After`` is honoured (never retried sooner);
otherwise the wait grows exponentially with jitter, so many clients refused at once do not come back
at once.

A call is repeated only where repeating it is safe. Reads and generations are (``Replay.SAFE``); an
upload or a delete is repeated only where the server surely did not act on it — the connection failed
before the request went out, or the server refused it with 429/503 — unless it carries ``If-Match``,
which makes a repeat harmless: it cannot overwrite a change made meanwhile.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import httpx

from ._exceptions import APIStatusError, RateLimitError, ServiceUnavailableError

# the connection was never made: nothing was sent, so any call may be repeated
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# a retry cannot help these
_PERMANENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.ProxyError)


class Replay(enum.Enum):
    """Whether a call may be sent again after an answer was lost."""

    SAFE = "safe"  # repeating cannot change the outcome
    IF_NOT_APPLIED = "if_not_applied"  # only when the server surely did not act on it


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. ``max_retries`` 0 turns retries off."""

    max_retries: int = 2
    initial_backoff: float = 0.5  # seconds before the first retry (before jitter)
    max_backoff: float = 8.0
    max_retry_after: float = 60.0  # a longer Retry-After is raised to the caller, not waited for

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")

    def after_status(self, attempt: int, error: APIStatusError) -> float | None:
        """Seconds to wait before repeating a call answered with ``error``, or None to raise it.

        ``attempt`` counts the retries made so far (0 after the first try).
        """
        if attempt >= self.max_retries:
            return None
        if isinstance(error, RateLimitError):
            return self._honour(error.retry_after) if error.retry_after is not None else None
        if isinstance(error, ServiceUnavailableError):
            return self._honour(error.retry_after) if error.retry_after is not None else self.backoff(attempt)
        return None

    def after_transport_error(self, attempt: int, exc: httpx.TransportError, replay: Replay) -> float | None:
        """Seconds to wait before repeating a call that got no answer, or None to raise."""
        if attempt >= self.max_retries or isinstance(exc, _PERMANENT):
            return None
        if isinstance(exc, _NOT_SENT) or replay is Replay.SAFE:
            return self.backoff(attempt)
        return None

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": between half and all of the capped exponential."""
        cap = min(self.max_backoff, self.initial_backoff * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)

    def _honour(self, retry_after: float) -> float | None:
        if retry_after > self.max_retry_after:
            return None
        return retry_after + random.uniform(0, min(1.0, 0.1 * retry_after))  # never sooner than asked
