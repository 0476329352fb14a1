"""What a benchmark run observed: when each request was submitted, produced its first token and finished."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timeline:
    """Timestamps (``time.perf_counter``) per request id, and the new tokens counted over the run."""

    submitted: dict[str, float] = field(default_factory=dict)
    first_token: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    started: float = 0.0
    ended: float = 0.0

    def record(self, events: Sequence[tuple[str, int, bool]]) -> int:
        """Note a system's events ``(request id, new tokens, finished)`` as of now; returns how many finished."""
        now, finished_now = time.perf_counter(), 0
        for request_id, new_tokens, finished in events:
            self.tokens += new_tokens
            if new_tokens:
                self.first_token.setdefault(request_id, now)
            if finished:
                self.finished[request_id] = now
                finished_now += 1
        return finished_now

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttfts(self) -> list[float]:
        """Each request's time to first token."""
        return [self.first_token[r] - self.submitted[r] for r in self.first_token]

    def summary(self) -> dict[str, float]:
        """Throughput (new tokens/s), request latency and time to first token (p50, p99), wall time."""
        latency = [self.finished[r] - self.submitted[r] for r in self.finished]
        ttft = self.ttfts()
        return {
            "tokens_per_s": self.tokens_per_s,
            "p50_latency_s": percentile(latency, 50),
            "p99_latency_s": percentile(latency, 99),
            "p50_ttft_s": percentile(ttft, 50),
            "p99_ttft_s": percentile(ttft, 99),
            "requests": len(self.finished),
            "tokens": self.tokens,
            "wall_s": self.wall_s,
        }


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (1-99) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def median_run(runs: Sequence[Timeline]) -> Timeline:
    """Of repeated runs of one system, the one with the median throughput (machines are noisy)."""
    return sorted(runs, key=lambda t: t.tokens_per_s)[len(runs) // 2]


def summarize(runs: Sequence[Timeline]) -> dict[str, Any]:
    """The median run's summary, and every run's throughput in the order they ran (``runs_tokens_per_s``)."""
    return {**median_run(runs).summary(), "runs_tokens_per_s": [t.tokens_per_s for t in runs]}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of run-by-run ratios of two interleaved series: run i of each ran back to back, so
    drift in machine speed cancels within a pair (steadier than a ratio of medians)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
