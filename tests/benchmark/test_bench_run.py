"""``prefix-serve bench`` end to end: a quick in-process run (a real server process for the HTTP
section) and the store section on a real Redis (``--url`` runs: ``test_bench_remote``)."""

from __future__ import annotations

import csv
import json
import statistics
import struct
from pathlib import Path

import pytest

from server.benchmark.models import build_model
from server.benchmark.settings import QUICK
from server.benchmark.timeline import paired_ratio
from server.cli import main
from testing.redis_server import running_redis

pytestmark = pytest.mark.e2e  # starts servers or other processes

BASELINES = {
    "engine-mixed",
    "engine-one-task",
    "engine-extras",
    "engine-soft-prompts",
    "peft-serial",
    "peft-grouped",
    "engine-varied",
    "static-varied",
    "engine-varied-open",
    "static-varied-open",
}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench")
    return main(["bench", "--quick", "--out", str(out)]), out


def test_quick_run_measures_every_section(quick_run: tuple[int, Path]) -> None:
    status, out = quick_run
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "in-process" and report["machine"]["cpus"] >= 1
    assert set(report["baselines"]) == BASELINES
    requests, new_tokens = QUICK["workload"].requests, QUICK["workload"].new_tokens[0]
    for name in ("engine-mixed", "engine-one-task", "engine-soft-prompts", "peft-serial", "peft-grouped"):
        summary = report["baselines"][name]
        assert summary["requests"] == requests and summary["tokens"] == requests * new_tokens, name
        assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall_s"])
        assert 0 < summary["p50_latency_s"] <= summary["p99_latency_s"] <= summary["wall_s"]
    assert report["baselines"]["engine-varied-open"]["arrival_rate"] > 0
    soft = report["baselines"]["engine-soft-prompts"]
    assert soft["soft_prompt_tasks"] == QUICK["tasks"] // 2  # every other task
    assert soft["soft_prompt_encode_ms"] > 0 and soft["prefix_decode_cast_ms"] > 0
    curves = report["curves"]
    for name, key in (
        ("concurrency", "concurrency_curve"),
        ("tasks", "tasks_curve"),
        ("prefix-length", "prefix_curve"),
        ("cache-budget", "cache_curve"),
    ):
        assert [p["x"] for p in curves[name]] == list(QUICK[key]), name
        assert all(p["tokens_per_s"] > 0 and p["requests"] > 0 for p in curves[name]), name
    assert curves["prefix-length"][0]["relative"] == 1.0  # no prefix is the reference
    hit_rates = [p["hit_rate"] for p in curves["cache-budget"]]
    assert hit_rates[0] == 1.0 > hit_rates[-1]  # all fits at 0.5x; at 2x some acquires must load
    assert [row["clients"] for row in report["http"]] == list(QUICK["http_concurrency"])
    for row in report["http"]:
        assert row["http"]["tokens"] > 0 and row["in_process"]["tokens"] > 0
        assert row["http_over_in_process"] == pytest.approx(
            row["http"]["tokens_per_s"] / row["in_process"]["tokens_per_s"]
        )
    assert [row["model"] for row in report["memory"]] == [
        "demo",
        "Llama-3.2-1B",
        "Llama-3.1-8B",
        "Llama-3.1-70B",
    ]


def test_targets_are_the_ratios_of_the_same_run(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "report.json").read_text())
    targets = {t["name"]: t for t in report["targets"]}
    assert len(targets) == 28
    tps = {name: s["tokens_per_s"] for name, s in report["baselines"].items()}
    mixed_vs_one = next(t for name, t in targets.items() if name.startswith("mixed tasks / one task"))
    assert mixed_vs_one["value"] == pytest.approx(tps["engine-mixed"] / tps["engine-one-task"])
    extras = next(t for name, t in targets.items() if name.startswith("a quarter of rows with logprobs"))
    assert extras["value"] == pytest.approx(tps["engine-extras"] / tps["engine-mixed"])
    soft = targets["the 8-task mix with half the tasks soft prompts / all deep prefixes, throughput"]
    runs = {name: s["runs_tokens_per_s"] for name, s in report["baselines"].items()}
    assert soft["threshold"] == 0.95 and not soft["at_most"]
    assert soft["value"] == pytest.approx(paired_ratio(runs["engine-soft-prompts"], runs["engine-mixed"]))
    serial = next(t for name, t in targets.items() if "PEFT one at a time" in name)
    assert serial["value"] == pytest.approx(tps["engine-mixed"] / tps["peft-serial"])
    prefix = {p["x"]: p["runs_tokens_per_s"] for p in report["curves"]["prefix-length"]}
    prefix_target = next(t for name, t in targets.items() if name.startswith("prefix of 32"))
    (with_prefix,), (before, after) = prefix[32], prefix[0]  # one round: the point between two reference runs
    assert prefix_target["value"] == pytest.approx(with_prefix / ((before + after) / 2))
    for target in targets.values():
        assert target["value"] is not None, target["name"]  # --quick runs every section
        passed = (
            target["value"] <= target["threshold"]
            if target["at_most"]
            else target["value"] >= target["threshold"]
        )
        assert target["verdict"] == ("PASS" if passed else "FAIL")


def test_tables_are_written_as_csv_and_curves_as_plots(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    with (out / "baselines.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["system"] for row in rows} == BASELINES
    assert all(float(row["tokens_per_s"]) > 0 for row in rows)
    with (out / "targets.csv").open() as f:
        assert {row["verdict"] for row in csv.DictReader(f)} <= {"PASS", "FAIL"}
    with (out / "store.csv").open() as f:
        (store_row,) = csv.DictReader(f)
    assert store_row["backend"] == "filesystem" and float(store_row["load_p50_ms"]) > 0
    with (out / "memory.csv").open() as f:
        llama8b = next(row for row in csv.DictReader(f) if row["model"] == "Llama-3.1-8B")
    assert int(llama8b["bytes_per_prefix"]) == 20 * 2 * 32 * 8 * 128 * 2
    for name in ("concurrency", "tasks", "prefix-length", "cache-budget"):
        with (out / f"curve-{name}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == 2
        assert _png_size(out / f"curve-{name}.png") == (1000, 400)
    assert _png_size(out / "http.png") == (600, 400)
    text = (out / "report.md").read_text()
    for title in ("**systems (same run)**", "**curve: cache-budget**", "**task memory", "**targets**"):
        assert title in text
    assert text.count("| PASS |") + text.count("| FAIL |") == 28
    assert "| engine-soft-prompts |" in text and "**soft prompts: keys and values computed once" in text
    with (out / "long-prompts.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 11
    with (out / "encoder-decoder.csv").open() as f:
        systems = {row["system"] for row in csv.DictReader(f)}
    assert systems == {"engine-mixed", "engine-one-task", "peft-serial", "peft-grouped"}
    with (out / "scale.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4  # uploads and a page on the filesystem, traffic, start-up
    with (out / "prompt-cache.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6 + len(QUICK["prompt_cache"].prefix_tokens)


def test_the_long_prompt_section_measures_what_it_says(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    section = json.loads((out / "report.json").read_text())["long_prompts"]
    spec = QUICK["long_prompts"]
    mix = section["mix"]
    assert mix["together_over_apart"] == pytest.approx(
        statistics.median(r["together_s"] / r["apart_s"] for r in mix["rounds"])
    )
    chunked, one_step = section["join"]["chunked"], section["join"]["one_step"]
    assert chunked["steps_to_join"] == -(-spec.joining_tokens // chunked["chunk_tokens"])  # one chunk a step
    assert one_step["steps_to_join"] == 1
    shared = section["shared_prefix"]
    assert shared["rows"] == spec.shared_rows and shared["prefix_bytes_held"] == shared["one_copy_bytes"]
    assert (
        shared["copy_per_row_bytes"] == spec.shared_rows * shared["one_copy_bytes"]
    )  # 32 tokens: 2 full blocks
    assert shared["blocks_after"] == 0
    memory = section["memory"]
    assert memory["prompt_tokens"] == spec.joining_tokens and memory["kv_bytes"] > 0
    decode = section["decode"]
    assert decode["paged_pass_ms"] > 0 and decode["dense_pass_ms"] > 0 and decode["engine_step_ms"] > 0


def test_the_prompt_cache_section_measures_what_it_says(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    section = json.loads((out / "report.json").read_text())["prompt_cache"]
    spec = QUICK["prompt_cache"]
    shared = section["shared_system"]
    assert shared["cold_over_alone"] == pytest.approx(
        statistics.median(r["cold_wall_s"] / r["alone_wall_s"] for r in shared["rounds"])
    )
    assert len(shared["rounds"]) == QUICK["repeats"]
    chat = section["chat"]
    for name in ("cached", "uncached"):
        assert len(chat[name]["ttft_s"]) == spec.chat_turns
        assert chat[name]["history_tokens"] == spec.chat_turns * (spec.turn_tokens + spec.new_tokens)
    # each turn after the first finds the full blocks of the history it resends; without the cache, none
    assert chat["cached"]["hit_tokens"] > 0 and chat["uncached"]["hit_tokens"] == 0
    assert list(section["task_prefix"]) == [str(n) for n in spec.prefix_tokens]
    ttft = section["ttft"]
    assert ttft["ratio"] == pytest.approx(statistics.median(r["ratio"] for r in ttft["rounds"]))


def test_the_lora_section_measures_what_it_says(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    section = json.loads((out / "report.json").read_text())["lora"]
    systems = section["systems"]
    assert list(systems) == ["base", "lora-half", "prefix-half"]
    assert {s["requests"] for s in systems.values()} == {QUICK["workload"].requests}
    assert section["lora_over_base"] == pytest.approx(
        statistics.median(
            a / b
            for a, b in zip(
                systems["lora-half"]["runs_tokens_per_s"], systems["base"]["runs_tokens_per_s"], strict=True
            )
        )
    )
    # rank 16 on q (128 -> 128), k and v (128 -> 64), o (128 -> 128) of the tiny model's 2 layers, float32
    assert section["lora_bytes"] == 2 * 16 * (256 + 2 * 192 + 256) * 4
    assert section["prefix_bytes"] == section["prefix_tokens"] * 2 * 2 * 2 * 32 * 4


def test_the_scale_section_measures_what_it_says(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    section = json.loads((out / "report.json").read_text())["scale"]
    spec = QUICK["scale"]
    uploads = section["uploads"]["filesystem"]
    assert len(uploads["batch_s"]) == spec.tasks // spec.batch
    assert uploads["last_over_first"] == pytest.approx(uploads["batch_s"][0] / uploads["batch_s"][-1])
    traffic = section["traffic"]
    assert traffic["tasks"] == spec.tasks and traffic["budget_tasks"] == max(
        spec.tasks // 10, QUICK["concurrency"]
    )
    assert section["startup"]["tasks"] == spec.startup_tasks and section["startup"]["full_s"] > 0


def test_the_encoder_decoder_section_runs_every_system_on_the_same_requests(
    quick_run: tuple[int, Path],
) -> None:
    _, out = quick_run
    report = json.loads((out / "report.json").read_text())
    systems = report["encoder_decoder"]["systems"]
    requests, new_tokens = QUICK["workload"].requests, QUICK["workload"].new_tokens[0]
    for name, summary in systems.items():
        assert summary["requests"] == requests and summary["tokens"] == requests * new_tokens, name
    targets = {t["name"]: t for t in report["targets"]}
    serial = targets[f"T5: engine ({QUICK['concurrency']} clients, mixed) / PEFT one at a time"]
    assert serial["value"] == pytest.approx(
        paired_ratio(
            systems["engine-mixed"]["runs_tokens_per_s"], systems["peft-serial"]["runs_tokens_per_s"]
        )
    )


def test_store_section_measures_a_real_redis(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as redis_server:
        args = ["bench", "--quick", "--sections", "store", "--redis-url", redis_server.url]
        assert main([*args, "--store-samples", "5", "--out", str(tmp_path / "out")]) == 0
        # what the section wrote is in this Redis: 16 load tasks and 16 thrash tasks of tenant "bench"
        assert len(list(redis_server.client().scan_iter("prefix-serve:rec:bench:*"))) == 32
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["store"]) == {"filesystem", "redis"}
    assert report["store"]["redis"]["load"]["acquire"]["n"] == 5
    assert all(t["verdict"] == "not run" for t in report["targets"])


def test_build_model_geometries_share_the_demo_tokenizer() -> None:
    base = build_model("tiny")
    assert base.geometry.num_layers == 2 and base.geometry.num_kv_heads == 2
    assert base.model.config.vocab_size == len(base.tokenizer)
