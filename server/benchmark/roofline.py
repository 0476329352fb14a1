"""What a decode step costs against what it must cost (the ``roofline`` section), on any device.

A decode step must read every weight once and the keys and values every row attends over (its prefix's
included); nothing can make it faster than those bytes over the device's memory bandwidth. The section
measures the bandwidth (a large device-to-device copy: bytes read + written, over its time), counts those
bytes, and for each batch size times the engine's decode steps (rows of mixed prefixes, every row past its
prompt): ``floor_ms`` = bytes / bandwidth, ``fraction`` = floor / step. A fraction near 1 is a step bound by
memory; far below it, by kernel launches and Python (what CUDA graphs remove, issue #21).
``graphs_equal_eager`` is null: the engine runs decode steps eagerly (no captured graphs yet).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import PreTrainedModel

from server.benchmark.baselines import Log
from server.benchmark.models import random_prefixes
from server.benchmark.settings import BenchSettings, RooflineSpec
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (the CPU runs eagerly: nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of ``nbytes`` moves (read + written), the median of
    ``repeats`` copies after a warm-up one."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


def weight_bytes(model: PreTrainedModel) -> int:
    """The weight bytes a decode step reads: every parameter and buffer once (tied weights are one), but an
    input embedding table of its own (a step reads only its rows' entries)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embeddings:
        tensors.pop(id(embeddings), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_rows(base: BaseModel, batch: int, spec: RooflineSpec, *, seed: int) -> list[GenerationRequest]:
    """``batch`` greedy rows of ``spec.prompt_tokens`` random tokens, on prefixes of 0 to
    ``spec.prefix_tokens`` virtual tokens (mixed), each generating enough to outlast the timed steps."""
    lengths = [spec.prefix_tokens * (i % 4) // 3 for i in range(batch)]  # 0, 1/3, 2/3 and all of it
    prefixes = random_prefixes(base, [n for n in lengths if n], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    vocab = base.model.config.vocab_size
    rows, taken = [], 0
    for i, length in enumerate(lengths):
        prefix = prefixes[taken] if length else None
        taken += bool(length)
        prompt = torch.randint(5, vocab, (spec.prompt_tokens,), generator=generator).tolist()
        new_tokens = spec.warmup_steps + spec.steps + 2
        rows.append(
            GenerationRequest(
                f"roof{batch}-{i}", prompt, prefix, SamplingParams(), new_tokens, ignore_eos=True
            )
        )
    return rows


def time_decode_steps(base: BaseModel, rows: list[GenerationRequest], spec: RooflineSpec) -> list[float]:
    """Seconds of each of ``spec.steps`` engine steps once every row is decoding (after the prompts'
    prefill and ``spec.warmup_steps`` decode steps)."""
    tokens = sum(
        len(r.prompt_ids) + r.max_new_tokens + (r.prefix.num_virtual_tokens if r.prefix else 0) for r in rows
    )
    core = EngineCore(
        base, SchedulerConfig(max_batch_size=len(rows), max_batch_tokens=tokens, max_waiting=len(rows))
    )
    for row in rows:
        core.add_request(row)
    started: set[str] = set()
    while len(started) < len(rows):  # prefill: every row has its first token
        started.update(output.request_id for output in core.step())
    for _ in range(spec.warmup_steps):
        core.step()
    seconds = []
    for _ in range(spec.steps):
        synchronize(base.device)
        start = time.perf_counter()
        core.step()  # its sampled tokens are read on the host: the step has finished on the device
        seconds.append(time.perf_counter() - start)
    return seconds


def roofline(base: BaseModel, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """The section's figures (``roofline.json``)."""
    spec = settings.roofline
    bandwidth = measure_bandwidth(base.device, spec.copy_mib << 20)
    weights = weight_bytes(base.model)
    per_token = base.geometry.bytes_per_virtual_token(base.dtype.itemsize)
    log(f"roofline: {bandwidth / 1e9:.1f} GB/s, {weights / 2**20:.1f} MiB of weights")
    rows = []
    for batch in spec.batches:
        requests = decode_rows(base, batch, spec, seed=batch)
        step_s = statistics.median(time_decode_steps(base, requests, spec))
        # the keys and values the timed steps attend over, on average: prefix + prompt + tokens so far
        context = [
            (r.prefix.num_virtual_tokens if r.prefix else 0)
            + len(r.prompt_ids)
            + 1
            + spec.warmup_steps
            + spec.steps / 2
            for r in requests
        ]
        step_bytes = weights + per_token * sum(context)
        floor_s = step_bytes / bandwidth
        rows.append(
            {
                "batch": batch,
                "step_ms": step_s * 1e3,
                "floor_ms": floor_s * 1e3,
                "fraction": floor_s / step_s,
                "kv_bytes": int(per_token * sum(context)),
            }
        )
        log(f"roofline: batch {batch} step {step_s * 1e3:.2f} ms, floor {floor_s * 1e3:.2f} ms")
    return {
        "device": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else "cpu",
        "geometry": settings.geometry,
        "dtype": str(base.dtype).removeprefix("torch."),
        "bandwidth_gbps": bandwidth / 1e9,
        "weight_bytes": weights,
        "rows": rows,
        "graphs_equal_eager": None,
    }
