"""Waiting for what can be observed, never for a fixed time: ``wait_until(predicate, "what")`` polls until
``predicate()`` returns a truthy value and returns that value, or fails after ``timeout_s`` saying what it
waited for and what it saw last.

The default bound is generous enough for a loaded 2-core CI machine: a test that passes waits only as long
as the thing takes, and only a test whose awaited state never comes pays the whole bound. A claim about
speed ("within a second") is not something a shared machine can check; assert instead on what shows the
mechanism (a counter, a state, an order), and keep the bound for "it happens at all".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

PATIENCE_S = 60.0  # the bound on waiting for what normally takes milliseconds to a few seconds
_POLL_S = 0.02


def wait_until(
    predicate: Callable[[], T], what: str, *, timeout_s: float = PATIENCE_S, interval_s: float = _POLL_S
) -> T:
    """Call ``predicate`` until it returns a truthy value and return it; an ``AssertionError`` naming
    ``what`` (and the last value) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting until {what} (last: {value!r:.300})")
        time.sleep(interval_s)


async def wait_until_async(
    predicate: Callable[[], T], what: str, *, timeout_s: float = PATIENCE_S, interval_s: float = _POLL_S
) -> T:
    """``wait_until`` inside an event loop: sleeps with ``asyncio.sleep``, so the loop's tasks run meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting until {what} (last: {value!r:.300})")
        await asyncio.sleep(interval_s)
