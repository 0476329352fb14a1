"""The ``roofline`` section: its bytes are the model's, its floor is those bytes over the measured bandwidth,
and its step times agree with an independent timing of the same engine steps."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pytest
import torch

from server.benchmark.models import build_model
from server.benchmark.roofline import decode_rows, measure_bandwidth, roofline, weight_bytes
from server.benchmark.settings import QUICK, BenchSettings, RooflineSpec
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.scheduler import SchedulerConfig

SPEC = RooflineSpec(batches=(1, 4), prompt_tokens=16, prefix_tokens=6, warmup_steps=2, steps=8, copy_mib=16)


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return build_model("tiny")


def test_the_floor_is_the_steps_bytes_over_the_measured_bandwidth(tiny: BaseModel) -> None:
    settings = replace(BenchSettings(**{**QUICK, "geometry": "tiny"}), roofline=SPEC)
    section = roofline(tiny, settings, log=lambda _: None)
    assert (section["device"], section["geometry"], section["dtype"]) == ("cpu", "tiny", "float32")
    assert section["graphs_equal_eager"] is None  # no captured graphs on the CPU
    bandwidth = section["bandwidth_gbps"] * 1e9
    per_token = tiny.geometry.bytes_per_virtual_token(4)
    assert [row["batch"] for row in section["rows"]] == [1, 4]
    for row in section["rows"]:
        rows = decode_rows(tiny, row["batch"], SPEC, seed=row["batch"])
        context = sum(
            (r.prefix.num_virtual_tokens if r.prefix else 0)
            + len(r.prompt_ids)
            + 1
            + SPEC.warmup_steps
            + SPEC.steps / 2
            for r in rows
        )
        assert row["kv_bytes"] == int(per_token * context)
        assert row["floor_ms"] == pytest.approx(
            (section["weight_bytes"] + per_token * context) / bandwidth * 1e3
        )
        assert row["fraction"] == pytest.approx(row["floor_ms"] / row["step_ms"])


def test_the_weights_are_every_parameter_once_but_an_untied_input_embedding(tiny: BaseModel) -> None:
    model = tiny.model
    counted = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
    )
    counted += sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model) == counted
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the table is read once, by the head
    try:
        assert weight_bytes(model) == counted  # the head's own matrix is gone, the shared one counted once
    finally:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def test_the_bandwidth_is_a_copys_bytes_over_its_time() -> None:
    nbytes = 64 << 20
    source, target = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    independent = 2 * nbytes / statistics.median(seconds)
    assert 0.33 < measure_bandwidth(torch.device("cpu"), nbytes) / independent < 3


def test_step_times_agree_with_an_independent_timing(tiny: BaseModel) -> None:
    settings = replace(BenchSettings(**{**QUICK, "geometry": "tiny"}), roofline=replace(SPEC, batches=(4,)))
    (row,) = roofline(tiny, settings, log=lambda _: None)["rows"]
    rows = decode_rows(tiny, 4, SPEC, seed=4)
    core = EngineCore(tiny, SchedulerConfig(max_batch_size=4, max_batch_tokens=4096))
    for request in rows:
        core.add_request(request)
    for _ in range(4):  # the prompts (one pass) and a few decode steps
        core.step()
    start = time.perf_counter()
    for _ in range(SPEC.steps):
        core.step()
    independent_ms = (time.perf_counter() - start) / SPEC.steps * 1e3
    assert 0.33 < row["step_ms"] / independent_ms < 3
