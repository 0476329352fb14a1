"""One benchmark run: the sections ``settings.sections`` names, in one process, on one model; returns the
report (``report.write_report`` / ``print_report`` show it)."""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

from server.benchmark.baselines import Log, run_baselines
from server.benchmark.curves import cache_budget_curve, concurrency_curve, prefix_length_curve, tasks_curve
from server.benchmark.encoder_decoder import encoder_decoder
from server.benchmark.long_prompts import long_prompts
from server.benchmark.lora_mix import lora_mix
from server.benchmark.memory import memory_table
from server.benchmark.models import build_model
from server.benchmark.over_http import http_vs_in_process
from server.benchmark.prompt_cache import prompt_cache
from server.benchmark.remote import RemoteTarget, measure_server, requests_per_point
from server.benchmark.roofline import roofline
from server.benchmark.scale import scale
from server.benchmark.settings import BenchSettings
from server.benchmark.store_costs import measure_stores
from server.benchmark.targets import evaluate


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run the benchmark here, or None."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        return f"--device {device!r}: {error}"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device!r}: this torch build or machine has no CUDA device"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device!r}: only cpu and cuda are supported"
    return None


def run_in_process(settings: BenchSettings, log: Log) -> dict[str, Any]:
    """Build the random model and measure every section against its baselines."""
    torch.set_num_threads(settings.threads)
    base = build_model(settings.geometry, device=settings.device, dtype=getattr(torch, settings.dtype))
    report: dict[str, Any] = {
        "mode": "in-process",
        "settings": settings.to_json(),
        "machine": machine(settings),
    }
    sections = set(settings.sections)
    curves: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-serve-bench-") as tmp:
        workdir = Path(tmp)
        if "baselines" in sections:
            report["baselines"] = run_baselines(base, settings, log)
        if "concurrency" in sections:
            curves["concurrency"] = concurrency_curve(base, settings, log)
        if "prefix-length" in sections:
            curves["prefix-length"] = prefix_length_curve(base, settings, log)
        if "tasks" in sections:
            curves["tasks"] = tasks_curve(base, settings, workdir, log)
        if "cache-budget" in sections:
            curves["cache-budget"] = cache_budget_curve(base, settings, workdir, log)
        report["curves"] = curves
        if "http" in sections:
            report["http"] = http_vs_in_process(base, settings, workdir, log)
        if "long-prompts" in sections:
            report["long_prompts"] = long_prompts(base, settings, log)
        if "prompt-cache" in sections:
            report["prompt_cache"] = prompt_cache(base, settings, log)
        if "lora" in sections:
            report["lora"] = lora_mix(base, settings, log)
        if "encoder-decoder" in sections:
            report["encoder_decoder"] = encoder_decoder(settings, workdir, log)
        if "scale" in sections:
            report["scale"] = scale(base, settings, workdir, log)
        if "store" in sections:
            urls = {"filesystem": (workdir / "store-costs").as_uri()}
            if settings.redis_url:
                urls["redis"] = settings.redis_url
            log(f"store: load and thrash on {', '.join(urls)}")
            report["store"] = measure_stores(
                urls,
                base.geometry,
                base.dtype,
                base.device,
                samples=settings.store_samples,
                rounds=settings.store_thrash_rounds,
            )
    if "memory" in sections:
        report["memory"] = _memory(settings)
    if "roofline" in sections:
        report["roofline"] = roofline(base, settings, log)
    report["targets"] = [target.to_json() for target in evaluate(report, settings.concurrency)]
    return report


def run_remote(settings: BenchSettings, target: RemoteTarget, log: Log) -> dict[str, Any]:
    """Measure a running server: its concurrency curve over HTTP (no in-process baselines)."""
    measured = measure_server(target, settings, log)
    report: dict[str, Any] = {
        "mode": "remote",
        "url": target.url,
        "tasks": measured.pop("tasks"),
        "settings": settings.to_json(),
        "remote": {
            "requests_per_point": {c: requests_per_point(settings, c) for c in settings.concurrency_curve},
            "min_seconds": target.min_seconds,
            "max_retry_wait_s": target.max_retry_wait_s,
        },
        **measured,
    }
    if "memory" in settings.sections:
        report["memory"] = _memory(settings)
    return report


def _memory(settings: BenchSettings) -> list[dict[str, Any]]:
    return [dataclasses.asdict(row) for row in memory_table(settings.memory_budget_bytes)]


def machine(settings: BenchSettings) -> dict[str, Any]:
    """What the numbers were measured on."""
    facts: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if settings.device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(settings.device))
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
