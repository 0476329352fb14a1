"""The issue's targets, evaluated on one run's results: a ratio, its threshold, PASS or FAIL. Throughput
ratios are paired run by run (``timeline.paired_ratio``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.benchmark.timeline import paired_ratio


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # None: its section did not run
    threshold: float
    at_most: bool = False  # the value must not exceed the threshold (else: must reach it)

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not run"
        passed = self.value <= self.threshold if self.at_most else self.value >= self.threshold
        return "PASS" if passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "at_most": self.at_most,
            "verdict": self.verdict,
        }


def _paired(numerator: Mapping[str, Any] | None, denominator: Mapping[str, Any] | None) -> float | None:
    """Throughput ratio of two summaries, paired run by run (``timeline.paired_ratio``)."""
    if numerator is None or denominator is None:
        return None
    return paired_ratio(numerator["runs_tokens_per_s"], denominator["runs_tokens_per_s"])


def _relative(points: Sequence[Mapping[str, Any]], x: float) -> float | None:
    """A curve point's throughput relative to the curve's reference (``curves._curve``), if it ran."""
    return next((p["relative"] for p in points if p["x"] == x and "relative" in p), None)


def evaluate(report: Mapping[str, Any], concurrency: int) -> list[Target]:
    """Targets from a report's ``baselines``, ``curves``, ``http`` and ``long_prompts`` parts (missing parts:
    not run)."""
    systems = report.get("baselines", {})
    curves = report.get("curves", {})
    http = {row["clients"]: row for row in report.get("http", [])}
    return [
        *_throughput_targets(systems, curves, http, concurrency),
        *_long_prompt_targets(report),
        *_prompt_cache_targets(report.get("prompt_cache")),
        *_lora_targets(report.get("lora")),
        *_scale_targets(report.get("scale")),
        *_encoder_decoder_targets(report.get("encoder_decoder", {}).get("systems", {}), concurrency),
    ]


def _throughput_targets(
    systems: Mapping[str, Any], curves: Mapping[str, Any], http: Mapping[int, Any], concurrency: int
) -> list[Target]:
    mixed = systems.get("engine-mixed")
    static, continuous = systems.get("static-varied"), systems.get("engine-varied")
    prefix, tasks = curves.get("prefix-length", []), curves.get("tasks", [])
    return [
        Target(
            "mixed tasks / one task, engine throughput", _paired(mixed, systems.get("engine-one-task")), 0.95
        ),
        Target(
            "a quarter of rows with logprobs=5 or a JSON schema / none, throughput",
            _paired(systems.get("engine-extras"), mixed),
            0.9,
        ),
        Target(
            "the 8-task mix with half the tasks soft prompts / all deep prefixes, throughput",
            _paired(systems.get("engine-soft-prompts"), mixed),
            0.95,
        ),
        Target(
            f"engine ({concurrency} clients, mixed) / PEFT one at a time",
            _paired(mixed, systems.get("peft-serial")),
            5.0,
        ),
        Target(
            f"engine ({concurrency} clients, mixed) / PEFT grouped by task",
            _paired(mixed, systems.get("peft-grouped")),
            1.5,
        ),
        Target(
            "static / continuous batching, p50 latency",
            static["p50_latency_s"] / continuous["p50_latency_s"] if static and continuous else None,
            1.0,
        ),
        Target(
            f"HTTP / in-process throughput ({concurrency} clients)",
            http[concurrency]["http_over_in_process"] if concurrency in http else None,
            0.9,
        ),
        Target(
            "prefix of 32 virtual tokens / no prefix, throughput",
            _relative(prefix, 32),
            0.9,
        ),
        Target("512 tasks / 8 tasks (all resident), throughput", _relative(tasks, 512), 0.9),
    ]


def _long_prompt_targets(report: Mapping[str, Any]) -> list[Target]:
    """The ``long-prompts`` section's targets; the latency bound is 8x on a CPU, 2x on a GPU."""
    section = report.get("long_prompts")
    on_gpu = str(report.get("settings", {}).get("device", "cpu")).startswith("cuda")

    def value(part: str, key: str) -> float | None:
        return section[part][key] if section else None

    shared = section["shared_prefix"] if section else None
    return [
        Target(
            "short prompts + a long one: together / apart, wall time",
            value("mix", "together_over_apart"),
            1.3,
            True,
        ),
        Target(
            "short requests' p50 latency beside a long prompt / alone",
            value("mix", "short_p50_together_over_alone"),
            2.0 if on_gpu else 8.0,
            True,
        ),
        Target(
            "one long request's peak memory growth / (its keys and values + activations)",
            value("memory", "growth_over_kv_plus_activations"),
            2.0,
            True,
        ),
        Target(
            "rows of one task: prefix bytes in the KV pool / one copy",
            shared["prefix_bytes_held"] / shared["one_copy_bytes"] if shared else None,
            1.0,
            True,
        ),
        Target(
            "decode pass at batch 16: dense layout / paged",
            value("decode", "dense_over_paged"),
            0.95,
        ),
    ]


def _lora_targets(section: Mapping[str, Any] | None) -> list[Target]:
    """The ``lora`` section's target (#35)."""
    clients = section["clients"] if section else 16
    return [
        Target(
            f"{clients} clients, half the rows on four LoRA tasks (r=16, q/k/v/o) / all on the base model",
            section["lora_over_base"] if section else None,
            0.85,
        )
    ]


def _prompt_cache_targets(section: Mapping[str, Any] | None) -> list[Target]:
    """The ``prompt-cache`` section's targets (#33)."""

    def value(part: str, key: str) -> float | None:
        return section[part][key] if section else None

    def prefix(length: str) -> float | None:
        part = section["task_prefix"].get(length) if section else None
        return part["ratio"] if part else None

    return [
        Target(
            "requests sharing a cached system prompt / the same requests without it, wall time",
            value("shared_system", "cached_over_alone"),
            3.0,
            True,
        ),
        Target(
            "TTFT p50 with the cached system prompt / a short prompt's, one at a time",
            value("ttft", "ratio"),
            3.0,
            True,
        ),
        Target(
            "a chat's last turn TTFT / its first turn's (history resent each turn)",
            section["chat"]["cached"]["last_over_first"] if section else None,
            1.5,
            True,
        ),
        Target("prompts sharing nothing: cache on / off, throughput", value("distinct", "on_over_off"), 0.97),
        Target("rows of one task: 200-token prefix / none, throughput", prefix("200"), 0.9),
        Target("rows of one task: 1,600-token prefix / none, throughput", prefix("1600"), 0.5),
    ]


def _scale_targets(section: Mapping[str, Any] | None) -> list[Target]:
    """The ``scale`` section's targets (#34), per store backend where they are the store's."""
    uploads = section["uploads"] if section else {"filesystem": None}
    listing = section["listing"] if section else {}
    return [
        *(
            Target(
                f"{backend}: uploads into a full tenant, the last batch's rate / the first's",
                part["last_over_first"] if part else None,
                0.8,
            )
            for backend, part in uploads.items()
        ),
        *(
            Target(
                f"{backend}: one page of the many-task tenant / one page of a tenant of 100, time",
                listing[backend]["ratio"] if section else None,
                2.0,
                True,
            )
            for backend in uploads
        ),
        Target(
            "Zipf traffic over every task, the cache holding a tenth / 8 resident tasks, throughput",
            section["traffic"]["ratio"] if section else None,
            0.9,
        ),
        Target(
            "start-up on the many-task store / on an empty one",
            section["startup"]["ratio"] if section else None,
            1.2,
            True,
        ),
    ]


def _encoder_decoder_targets(systems: Mapping[str, Any], concurrency: int) -> list[Target]:
    """The ``encoder-decoder`` section's targets (#20): the decoder-only model's, on a T5."""
    mixed = systems.get("engine-mixed")
    return [
        Target(
            "T5: mixed tasks / one task, engine throughput",
            _paired(mixed, systems.get("engine-one-task")),
            0.95,
        ),
        Target(
            f"T5: engine ({concurrency} clients, mixed) / PEFT one at a time",
            _paired(mixed, systems.get("peft-serial")),
            5.0,
        ),
        Target(
            f"T5: engine ({concurrency} clients, mixed) / PEFT grouped by task",
            _paired(mixed, systems.get("peft-grouped")),
            1.5,
        ),
    ]
