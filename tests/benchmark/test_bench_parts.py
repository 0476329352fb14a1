"""The benchmark's pure parts: options, workloads, percentiles, targets and the memory table."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
import torch

from server.benchmark.baselines import mix_lengths
from server.benchmark.curves import _curve
from server.benchmark.memory import memory_table
from server.benchmark.models import build_model, random_soft_prompts, random_tasks
from server.benchmark.remote import _retry_after_s, requests_per_point
from server.benchmark.remote_prompts import PROBE_WORDS, CountTokens, calibrate
from server.benchmark.report import write_report
from server.benchmark.settings import QUICK, BenchSettings, WorkloadSpec
from server.benchmark.soft_prompt_mix import with_soft_prompts
from server.benchmark.suite import device_problem
from server.benchmark.tables import markdown, report_tables
from server.benchmark.targets import evaluate
from server.benchmark.timeline import Timeline, paired_ratio, percentile
from server.benchmark.workload import WORDS, sample_shapes, single_token_words
from server.cli import bench, build_parser
from server.cli.bench import settings_from
from server.demo_model import build_demo_tokenizer
from server.engine.soft_prompts import soft_prompt_prefix


def _settings(*argv: str) -> BenchSettings:
    return settings_from(build_parser().parse_args(["bench", *argv]))


def test_options_override_defaults_and_quick() -> None:
    assert _settings() == BenchSettings()
    quick = _settings("--quick", "--requests", "12", "--new-tokens", "2-9", "--prefix-curve", "0,64")
    assert quick.geometry == QUICK["geometry"] and quick.concurrency == QUICK["concurrency"]
    assert quick.workload == WorkloadSpec(requests=12, prompt_tokens=(4, 12), new_tokens=(2, 9))
    assert quick.prefix_curve == (0, 64)
    assert _settings("--memory-budget-gib", "0.5").memory_budget_bytes == 1 << 29
    assert _settings("--sections", "tasks,memory").sections == ("tasks", "memory")
    assert _settings("--rate", "2.5").arrival_rate == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        ["--new-tokens", "9-2"],
        ["--prompt-tokens", "0-4"],
        ["--prompt-tokens", "a-b"],
        ["--cache-curve", "1,x"],
        ["--prefix-curve", "-8"],
        ["--sections", "baselines,warp-drive"],
        ["--geometry", "llama-405b"],
        ["--requests", "0"],
        ["--concurrency", "-3"],
        ["--repeats", "two"],
        ["--rate", "nan"],
        ["--memory-budget-gib", "0"],
        ["--concurrency-curve", "0,4"],
        ["--cache-curve", "0,1"],
        ["--min-seconds", "-1"],
        ["--max-retry-wait", "nan"],
    ],
)
def test_bad_options_are_refused_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_workload_is_seeded_and_covers_tasks_evenly() -> None:
    spec = WorkloadSpec(requests=40, prompt_tokens=(3, 7), new_tokens=(1, 5), seed=4)
    shapes = sample_shapes(spec, ["a", "b", "c", "d"])
    assert shapes == sample_shapes(spec, ["a", "b", "c", "d"])
    assert [s.task_id for s in shapes[:5]] == ["a", "b", "c", "d", "a"]
    assert all(3 <= s.prompt_length <= 7 and 1 <= s.max_new_tokens <= 5 for s in shapes)
    assert len({s.request_id for s in shapes}) == 40
    drawn = sample_shapes(spec, [f"t{i}" for i in range(512)], random_tasks=True)
    assert len({s.task_id for s in drawn}) > 30


def test_single_token_words_are_one_token_each() -> None:
    tokenizer = build_demo_tokenizer()
    words = single_token_words(tokenizer)
    assert len(words) >= 20 and words != WORDS
    assert all(len(tokenizer(f" {word}").input_ids) == 1 for word in words)


def test_every_bench_option_states_its_default() -> None:
    commands = argparse.ArgumentParser().add_subparsers()
    bench.register(commands)
    options = [a for a in commands.choices["bench"]._actions if a.option_strings != ["-h", "--help"]]
    assert len(options) > 25
    missing = [a.option_strings[0] for a in options if "(default: " not in (a.help or "")]
    assert not missing


def _counter(tokenize: Callable[[str], Sequence[object]]) -> CountTokens:
    """The server's prompt token count, as ``calibrate`` asks for it, with a tokenizer of this process."""

    async def count(prompt: str) -> int:
        return len(tokenize(prompt))

    return count


def test_calibrated_prompts_have_exactly_the_tokens_asked_for() -> None:
    tokenizer = build_demo_tokenizer()
    prompts = asyncio.run(calibrate(_counter(lambda p: tokenizer(p).input_ids)))
    assert prompts.additive and prompts.offset == 0 and prompts.probes == 5
    assert prompts.word_tokens == dict.fromkeys(PROBE_WORDS[:4], 1)
    rng = random.Random(0)
    for tokens in range(1, 300):
        prompt = prompts.prompt(tokens, rng)
        assert len(tokenizer(prompt).input_ids) == tokens, prompt


def test_calibration_finds_an_offset_and_words_of_several_tokens() -> None:
    # a character-level tokenizer that adds BOS: no word is one token, " the" is 4
    prompts = asyncio.run(calibrate(_counter(lambda p: ["<s>", *p])))
    assert prompts.additive and prompts.offset == 1 and prompts.shortest == 1 + 3
    assert prompts.word_tokens["the"] == 4 and prompts.word_tokens["of"] == 3
    assert prompts.probes == 1 + len(PROBE_WORDS)  # every word probed: none is one token
    rng = random.Random(0)
    for tokens in range(7, 200):  # 3 and 4 make every count from 6 on, with the offset 7
        assert 1 + len(prompts.prompt(tokens, rng)) == tokens
    assert 1 + len(prompts.prompt(2, rng)) == 4  # too short for any word: the shortest prompt


def test_calibration_notices_a_tokenizer_that_does_not_add_up() -> None:
    # repeats of a word merge: 16 words count as 2 tokens
    prompts = asyncio.run(calibrate(_counter(lambda p: [*sorted(set(p.split())), "x"])))
    assert not prompts.additive


def test_retry_after_is_seconds_or_a_date() -> None:
    def answered(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value} if value is not None else {})

    assert _retry_after_s(answered("12")) == 12.0
    assert _retry_after_s(answered("0.5")) == 0.5
    assert 8 < _retry_after_s(answered(email.utils.formatdate(time.time() + 10, usegmt=True))) <= 10
    assert _retry_after_s(answered(None)) == 1.0 and _retry_after_s(answered("soon")) == 1.0


def test_a_remote_point_sends_requests_or_one_per_client() -> None:
    settings = _settings("--requests", "12")
    assert [requests_per_point(settings, c) for c in (1, 4, 12, 64)] == [12, 12, 12, 64]


def test_mix_lengths_spread_over_4_to_32() -> None:
    assert mix_lengths(8) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert mix_lengths(1) == [4]
    assert mix_lengths(3) == [4, 18, 32]


def test_paired_ratio_cancels_drift_between_pairs() -> None:
    # the machine slows down 2x between pairs; within each pair a is 10% faster than b
    assert paired_ratio([110.0, 55.0, 220.0], [100.0, 50.0, 200.0]) == pytest.approx(1.1)
    assert paired_ratio([1.0, 3.0, 100.0], [1.0, 1.0, 1.0]) == 3.0  # the median: one outlier pair is ignored
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_closed_loops_send_two_to_eight_requests_per_client() -> None:
    spec = WorkloadSpec(requests=48)
    assert [spec.for_clients(c).requests for c in (1, 2, 4, 8, 16, 32, 64)] == [8, 16, 32, 48, 48, 64, 128]


def test_percentiles_and_throughput() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    timeline = Timeline(started=10.0, ended=12.0, submitted={"a": 10.0, "b": 10.5})
    timeline.first_token, timeline.finished, timeline.tokens = (
        {"a": 10.1, "b": 11.0},
        {"a": 11.0, "b": 12.0},
        30,
    )
    summary = timeline.summary()
    assert summary["tokens_per_s"] == 15.0 and summary["requests"] == 2
    assert summary["p50_latency_s"] == pytest.approx(1.25) and summary["p99_ttft_s"] <= 0.5


def test_curve_points_run_between_two_reference_runs_so_linear_drift_cancels() -> None:
    order: list[float] = []
    cost = {0: 1.0, 8: 1.25, 32: 2.0}  # seconds per token at the first run; the machine slows each run

    def run(x: float) -> Timeline:
        order.append(x)
        slowdown = 1 + 0.1 * len(order)
        return Timeline(started=0.0, ended=cost[int(x)] * slowdown, tokens=1)

    settings = BenchSettings(repeats=2)
    points = {
        p["x"]: p for p in _curve([0, 8, 32], run, settings, "test", lambda _: None, warm_up=0, reference=0)
    }
    assert order == [0, 0, 8, 0, 32, 0, 0, 8, 0, 32, 0]  # the warm-up, then each round's brackets
    # Each ratio is to the mean of the reference runs around it: drift linear in time cancels to first order.
    assert points[8]["relative"] == pytest.approx(0.8, rel=0.01)
    assert points[32]["relative"] == pytest.approx(0.5, rel=0.01)
    assert points[0]["relative"] == 1.0 and len(points[0]["runs_tokens_per_s"]) == 6


def _summary(tokens_per_s: float, p50: float = 1.0) -> dict[str, object]:
    return {"tokens_per_s": tokens_per_s, "p50_latency_s": p50, "runs_tokens_per_s": [tokens_per_s]}


def test_targets_pass_fail_and_not_run() -> None:
    report = {
        "baselines": {
            "engine-mixed": _summary(100.0),
            "engine-one-task": _summary(110.0),
            "engine-extras": _summary(95.0),
            "engine-soft-prompts": _summary(96.0),
            "peft-serial": _summary(10.0),
            "peft-grouped": _summary(80.0),
            "engine-varied": _summary(90.0, p50=2.0),
            "static-varied": _summary(70.0, p50=3.0),
        },
        "curves": {
            "prefix-length": [
                {"x": 0, **_summary(50.0), "relative": 1.0},
                {"x": 32, **_summary(46.0), "relative": 0.92},
            ]
        },
    }
    verdicts = [(t.value, t.verdict) for t in evaluate(report, concurrency=16)]
    assert verdicts == [
        (pytest.approx(100 / 110), "FAIL"),
        (pytest.approx(0.95), "PASS"),
        (pytest.approx(0.96), "PASS"),
        (10.0, "PASS"),
        (1.25, "FAIL"),
        (1.5, "PASS"),
        (None, "not run"),  # no HTTP section
        (pytest.approx(0.92), "PASS"),
        (None, "not run"),  # no tasks curve
        *[(None, "not run")] * 5,  # no long-prompts section
        *[(None, "not run")] * 6,  # no prompt-cache section
        (None, "not run"),  # no lora section
        *[(None, "not run")] * 4,  # no scale section
        *[(None, "not run")] * 3,  # no encoder-decoder section
    ]


def test_every_other_task_becomes_a_soft_prompt_of_the_same_length() -> None:
    base = build_model("tiny")
    prefixes = random_tasks(base, [4, 8, 12, 16], seed=0)
    tasks, load = with_soft_prompts(base, prefixes, seed=11)
    assert tasks["task0"] is prefixes["task0"] and tasks["task2"] is prefixes["task2"]
    soft_prompts = random_soft_prompts(base, [8, 16], seed=11)
    for name, soft_prompt in zip(("task1", "task3"), soft_prompts, strict=True):
        expected = soft_prompt_prefix(base, soft_prompt)
        assert tasks[name].num_virtual_tokens == prefixes[name].num_virtual_tokens
        torch.testing.assert_close(tasks[name].keys, expected.keys)
        torch.testing.assert_close(tasks[name].values, expected.values)
    # the scale of the model's token embeddings, not of standard-normal noise
    embeddings = base.model.get_input_embeddings().weight
    assert soft_prompts[1].embeddings.std() == pytest.approx(float(embeddings.std()), rel=0.3)
    assert load["soft_prompt_tasks"] == 2
    assert load["soft_prompt_encode_ms"] > 0 and load["prefix_decode_cast_ms"] > 0


def test_long_prompt_targets_are_upper_bounds_and_the_latency_bound_is_tighter_on_a_gpu() -> None:
    section = {
        "mix": {"together_over_apart": 1.31, "short_p50_together_over_alone": 3.0},
        "memory": {"growth_over_kv_plus_activations": 0.6},
        "shared_prefix": {"prefix_bytes_held": 1024, "one_copy_bytes": 1024},
        "decode": {"dense_over_paged": 0.97},
    }
    on_cpu = {t.name: t for t in evaluate({"long_prompts": section, "settings": {"device": "cpu"}}, 16)}
    on_gpu = {t.name: t for t in evaluate({"long_prompts": section, "settings": {"device": "cuda:0"}}, 16)}
    latency = "short requests' p50 latency beside a long prompt / alone"
    assert (on_cpu[latency].threshold, on_cpu[latency].verdict) == (8.0, "PASS")
    assert (on_gpu[latency].threshold, on_gpu[latency].verdict) == (2.0, "FAIL")
    assert on_cpu["short prompts + a long one: together / apart, wall time"].verdict == "FAIL"  # 1.31 > 1.3
    assert on_cpu["rows of one task: prefix bytes in the KV pool / one copy"].verdict == "PASS"  # 1 ≤ 1
    assert on_cpu["decode pass at batch 16: dense layout / paged"].verdict == "PASS"


def test_memory_table_matches_the_published_shapes() -> None:
    rows = {row.model: row for row in memory_table(budget_bytes=4 << 30)}
    llama8b = rows["Llama-3.1-8B"]
    assert llama8b.parameters == 8_030_261_248
    assert llama8b.bytes_per_virtual_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert llama8b.bytes_per_prefix == 20 * 128 * 1024 and llama8b.prefixes_in_budget == 1638
    assert rows["Llama-3.2-1B"].parameters == 1_235_814_400 and rows["Llama-3.2-1B"].geometry == "16x8x64"
    assert rows["Llama-3.1-70B"].bytes_per_virtual_token == 2 * 80 * 8 * 128 * 2
    assert rows["demo"].dtype == "float32" and rows["demo"].bytes_per_virtual_token == 2 * 4 * 2 * 16 * 4
    assert all(row.prefix_share_of_weights < 0.05 for row in rows.values())
    # rank 16 on q (4096 -> 4096), k and v (4096 -> 1024), o (4096 -> 4096), 32 layers, bfloat16
    assert llama8b.bytes_per_lora == 32 * 16 * (8192 + 2 * 5120 + 8192) * 2
    assert llama8b.loras_in_budget == (4 << 30) // llama8b.bytes_per_lora


def test_a_report_folder_holds_one_run(tmp_path: Path) -> None:
    (tmp_path / "http.png").write_bytes(b"an earlier run's plot")
    (tmp_path / "notes.txt").write_text("mine")
    memory = [
        {
            "model": "m",
            "geometry": "1x1x1",
            "dtype": "float32",
            "bytes_per_virtual_token": 8,
            "bytes_per_prefix": 160,
            "prefix_share_of_weights": 0.5,
            "prefixes_in_budget": 3,
            "bytes_per_lora": 64,
            "loras_in_budget": 8,
        }
    ]
    written = write_report({"mode": "remote", "url": "u", "memory": memory}, tmp_path)
    assert sorted(p.name for p in written) == ["memory.csv", "report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "memory.csv",
        "notes.txt",
        "report.json",
        "report.md",
    ]


def test_markdown_tables_align_numbers_right_and_escape_pipes() -> None:
    targets = [
        {"name": "a | b", "value": 0.9512, "threshold": 0.95, "verdict": "PASS"},
        {"name": "c", "value": None, "threshold": 5.0, "verdict": "not run"},
    ]
    text = markdown(report_tables({"targets": targets, "curves": {"tasks": []}}))
    assert text.splitlines() == [
        "**curve: tasks**",
        "",
        "| distinct tasks in the mix | tok/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "",
        "**targets**",
        "",
        "| target | measured | threshold | verdict |",
        "| --- | ---: | ---: | ---: |",
        "| a \\| b | 0.951 | ≥ 0.95 | PASS |",
        "| c | - | ≥ 5 | not run |",
    ]


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        ("cpu", None),
        ("gpu", "--device 'gpu'"),
        ("meta", "only cpu and cuda"),
        ("cuda:0", None if torch.cuda.is_available() else "no CUDA"),
    ],
)
def test_devices_are_checked_before_the_model_is_built(device: str, problem: str | None) -> None:
    found = device_problem(device)
    assert found is None if problem is None else problem in found


def test_prompt_cache_targets_bound_the_cost_of_sharing_and_of_the_cache() -> None:
    def rounds(**figures: float) -> dict:
        return {**figures, "rounds": [figures]}

    section = {
        "shared_system": rounds(cold_over_alone=3.5, cached_over_alone=2.5),
        "ttft": rounds(ratio=3.5),
        "chat": {"cached": {"last_over_first": 1.2}, "uncached": {"last_over_first": 6.0}},
        "distinct": rounds(on_over_off=0.98),
        "task_prefix": {"200": rounds(ratio=0.85), "1600": rounds(ratio=0.6)},
    }
    verdicts = [(t.value, t.threshold, t.at_most, t.verdict) for t in evaluate({"prompt_cache": section}, 16)]
    assert verdicts[-14:-8] == [
        (2.5, 3.0, True, "PASS"),
        (3.5, 3.0, True, "FAIL"),
        (1.2, 1.5, True, "PASS"),
        (0.98, 0.97, False, "PASS"),
        (0.85, 0.9, False, "FAIL"),
        (0.6, 0.5, False, "PASS"),
    ]


def test_the_lora_target_is_the_paired_ratio_to_the_base_model() -> None:
    section = {"clients": 16, "lora_over_base": 0.9, "lora_over_prefix": 1.1}
    (target,) = [t for t in evaluate({"lora": section}, 16) if "LoRA" in t.name]
    assert (target.value, target.threshold, target.verdict) == (0.9, 0.85, "PASS")
    assert target.name.startswith("16 clients, half the rows on four LoRA tasks")


def test_scale_targets_hold_each_store_backend_to_its_bounds() -> None:
    section = {
        "spec": {"tasks": 10_000},
        "uploads": {"filesystem": {"last_over_first": 0.85}, "redis": {"last_over_first": 0.7}},
        "listing": {"filesystem": {"ratio": 1.5}, "redis": {"ratio": 2.5}},
        "traffic": {"ratio": 0.95},
        "startup": {"ratio": 1.3},
    }
    verdicts = [(t.name.split(":")[0], t.value, t.verdict) for t in evaluate({"scale": section}, 16)][-9:-3]
    assert verdicts == [
        ("filesystem", 0.85, "PASS"),
        ("redis", 0.7, "FAIL"),
        ("filesystem", 1.5, "PASS"),
        ("redis", 2.5, "FAIL"),
        (
            "Zipf traffic over every task, the cache holding a tenth / 8 resident tasks, throughput",
            0.95,
            "PASS",
        ),
        ("start-up on the many-task store / on an empty one", 1.3, "FAIL"),
    ]
