"""A report's tables as plain rows of text, rendered by ``report`` on the terminal (rich) and as
Markdown (``report.md``): one place decides what each table shows and how its numbers read."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CURVE_AXES = {  # curve name -> (x label, log-scaled x)
    "concurrency": ("concurrent clients", True),
    "prefix-length": ("virtual tokens per prefix", False),
    "tasks": ("distinct tasks in the mix", True),
    "cache-budget": ("working set / registry budget", True),
}
SUMMARY_KEYS = ("tokens_per_s", "p50_latency_s", "p99_latency_s", "p50_ttft_s", "p99_ttft_s", "requests")
# columns of curves that have them -> their titles: relative throughput, hit rate; a running server's
# prompt tokens as it counted them, its 429 answers and the requests given up on 429s
EXTRA_CURVE_COLUMNS = {
    "relative": "relative",
    "hit_rate": "hit rate",
    "prompt_tokens_min": "prompt tokens min",
    "prompt_tokens_max": "prompt tokens max",
    "rate_limited": "429 answers",
    "refused": "given up",
}
SUMMARY_COLUMNS = ("tok/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s", "requests")


@dataclass(frozen=True)
class ReportTable:
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    text_columns: int = 1  # the first columns are names (left-aligned); the rest numbers


def report_tables(report: Mapping[str, Any]) -> list[ReportTable]:
    """Every table of a report, in reading order; the targets last."""
    tables = []
    if report.get("baselines"):
        rows = [[name, *_summary_cells(s)] for name, s in report["baselines"].items()]
        tables.append(ReportTable("systems (same run)", ["system", *SUMMARY_COLUMNS], rows))
        soft = report["baselines"].get("engine-soft-prompts", {})
        if "soft_prompt_encode_ms" in soft:
            tables.append(_soft_prompt_load(soft))
    for name, points in report.get("curves", {}).items():
        extra = [key for key in EXTRA_CURVE_COLUMNS if points and key in points[0]]
        rows = [[number(p["x"]), *_summary_cells(p), *(number(p[k]) for k in extra)] for p in points]
        columns = [
            CURVE_AXES.get(name, (name, False))[0],
            *SUMMARY_COLUMNS,
            *(EXTRA_CURVE_COLUMNS[k] for k in extra),
        ]
        tables.append(ReportTable(f"curve: {name}", columns, rows))
    if report.get("http"):
        rows = [
            [
                str(row["clients"]),
                number(row["http"]["tokens_per_s"]),
                number(row["in_process"]["tokens_per_s"]),
                number(row["http_over_in_process"]),
                number(row["http"]["p50_latency_s"]),
                number(row["http"]["p99_latency_s"]),
            ]
            for row in report["http"]
        ]
        columns = [
            "clients",
            "HTTP tok/s",
            "in-process tok/s",
            "HTTP / in-process",
            "HTTP p50 s",
            "HTTP p99 s",
        ]
        tables.append(ReportTable("HTTP vs in-process (same run)", columns, rows, text_columns=0))
    if report.get("long_prompts"):
        tables.append(long_prompt_table(report["long_prompts"]))
    if report.get("prompt_cache"):
        tables.append(prompt_cache_table(report["prompt_cache"]))
    if report.get("scale"):
        tables.append(scale_table(report["scale"]))
    if report.get("encoder_decoder"):
        section = report["encoder_decoder"]
        rows = [[name, *_summary_cells(s)] for name, s in section["systems"].items()]
        title = f"encoder-decoder systems (same run; {section['model']})"
        tables.append(ReportTable(title, ["system", *SUMMARY_COLUMNS], rows))
    if report.get("store"):
        rows = [
            [r["backend"], *(number(v) for k, v in r.items() if k != "backend")]
            for r in store_rows(report["store"])
        ]
        columns = [
            "backend",
            "prefix bytes",
            "load p50 ms",
            "load p99 ms",
            "raw read p50 ms",
            "raw read p99 ms",
            "load / raw read p50",
            "acquires/s resident",
            "acquires/s at 2x budget",
        ]
        tables.append(
            ReportTable(
                "prefix store: 20-token prefixes of this model, load on a miss (same run)", columns, rows
            )
        )
    if report.get("lora"):
        tables.append(_lora(report["lora"]))
    if report.get("memory"):
        tables.append(_memory(report["memory"]))
    if report.get("roofline"):
        tables.append(_roofline(report["roofline"]))
    if report.get("targets"):
        rows = [
            [
                t["name"],
                "-" if t["value"] is None else number(t["value"]),
                f"{'≤' if t.get('at_most') else '≥'} {t['threshold']:g}",
                t["verdict"],
            ]
            for t in report["targets"]
        ]
        tables.append(ReportTable("targets", ["target", "measured", "threshold", "verdict"], rows))
    return tables


def store_rows(store: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per backend: load on a miss vs raw read, and acquisitions/s thrashing vs resident."""
    return [
        {
            "backend": backend,
            "prefix_bytes": r["prefix_bytes"],
            "load_p50_ms": r["load"]["acquire"]["p50_ms"],
            "load_p99_ms": r["load"]["acquire"]["p99_ms"],
            "raw_read_p50_ms": r["load"]["raw_read"]["p50_ms"],
            "raw_read_p99_ms": r["load"]["raw_read"]["p99_ms"],
            "load_over_raw_p50": r["load"]["ratio_p50"],
            "acquires_per_s_resident": r["thrash"]["all_resident"]["acquires_per_s"],
            "acquires_per_s_2x_budget": r["thrash"]["working_set_2x_budget"]["acquires_per_s"],
        }
        for backend, r in store.items()
    ]


def _soft_prompt_load(summary: Mapping[str, Any]) -> ReportTable:
    """What ``engine-soft-prompts`` paid once per task, outside its timed runs."""
    columns = ["soft-prompt tasks", "encode ms per task (median)", "deep prefix decode + cast ms (median)"]
    row = [
        number(summary["soft_prompt_tasks"]),
        number(summary["soft_prompt_encode_ms"]),
        number(summary["prefix_decode_cast_ms"]),
    ]
    return ReportTable("soft prompts: keys and values computed once at load (same run)", columns, [row], 0)


def _lora(section: Mapping[str, Any]) -> ReportTable:
    """The ``lora`` section: each system's throughput, the paired ratios and one task's bytes."""
    systems = section["systems"]
    pad = [""] * (len(SUMMARY_COLUMNS) - 1)
    rows = [[name, *_summary_cells(summary)] for name, summary in systems.items()]
    rows.append(["half LoRA / all base (paired)", number(section["lora_over_base"]), *pad])
    rows.append(["half LoRA / half prefix (paired)", number(section["lora_over_prefix"]), *pad])
    bytes_row = f"{size(section['lora_bytes'])} / {size(section['prefix_bytes'])}"
    rows.append(
        [
            f"one LoRA task (r={section['rank']}) / one {section['prefix_tokens']}-token prefix",
            bytes_row,
            *pad,
        ]
    )
    return ReportTable(
        f"LoRA tasks in the same batches ({section['clients']} clients, every other row on a task; same run)",
        ["system", *SUMMARY_COLUMNS],
        rows,
    )


def _roofline(section: Mapping[str, Any]) -> ReportTable:
    """Decode steps against the memory-bandwidth floor."""
    rows = [
        [number(r["batch"]), number(r["step_ms"]), number(r["floor_ms"]), f"{r['fraction']:.3f}"]
        for r in section["rows"]
    ]
    title = (
        f"roofline: decode steps on {section['device']} ({section['geometry']}, {section['dtype']}; "
        f"{section['bandwidth_gbps']:.1f} GB/s copy bandwidth, {size(section['weight_bytes'])} of weights)"
    )
    return ReportTable(title, ["batch", "step ms", "floor ms", "floor / step"], rows)


def _memory(rows: Sequence[Mapping[str, Any]]) -> ReportTable:
    columns = [
        "model",
        "layers x kv heads x head_dim",
        "dtype",
        "bytes / virtual token",
        "20-token prefix",
        "share of weights",
        "prefixes in budget",
        "LoRA r=16 q/k/v/o",
        "LoRA tasks in budget",
    ]
    cells = [
        [
            row["model"],
            row["geometry"],
            row["dtype"],
            f"{row['bytes_per_virtual_token']:,}",
            size(row["bytes_per_prefix"]),
            f"{row['prefix_share_of_weights']:.4%}",
            f"{row['prefixes_in_budget']:,}",
            size(row["bytes_per_lora"]),
            f"{row['loras_in_budget']:,}",
        ]
        for row in rows
    ]
    return ReportTable(
        "task memory (a prefix's keys + values of every layer; a LoRA task's A and B)",
        columns,
        cells,
        text_columns=3,
    )


def _summary_cells(summary: Mapping[str, Any]) -> list[str]:
    return [number(summary[key]) for key in SUMMARY_KEYS]


def number(value: float) -> str:
    """Integers with thousands separators; ratios and seconds with 3 decimals; throughput with 1."""
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def markdown(tables: Sequence[ReportTable]) -> str:
    """The tables as GitHub Markdown, each under its title."""
    parts = []
    for table in tables:
        align = ["---" if i < table.text_columns else "---:" for i in range(len(table.columns))]
        lines = [f"**{table.title}**", "", _md_row(table.columns), _md_row(align)]
        lines += [_md_row(row) for row in table.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def long_prompt_table(section: Mapping[str, Any]) -> ReportTable:
    """The ``long-prompts`` section as measurement / value rows."""
    spec, mix, join = section["spec"], section["mix"], section["join"]
    memory, shared, decode = section["memory"], section["shared_prefix"], section["decode"]
    mib = 1 << 20
    rows = [
        [
            f"{spec['short_requests']} short ({spec['short_tokens']} tokens) + 1 long ({spec['long_tokens']}), together s",
            number(mix["together_s"]),
        ],
        ["the same apart (shorts, then the long one) s", number(mix["apart_s"])],
        ["together / apart", number(mix["together_over_apart"])],
        [
            "short p50 latency together / alone s",
            f"{number(mix['short_p50_together_s'])} / {number(mix['short_p50_alone_s'])}",
        ],
        ["short p50 latency together / alone", number(mix["short_p50_together_over_alone"])],
        [
            f"worst inter-token gap of decoding rows while {spec['joining_tokens']} tokens join, chunked ms",
            f"{number(join['chunked']['worst_gap_ms'])} (median before: {number(join['chunked']['median_gap_before_ms'])})",
        ],
        ["the same, whole prompt in one step ms", number(join["one_step"]["worst_gap_ms"])],
        [
            f"one {memory['prompt_tokens']}-token request: peak growth / keys+values / activations MiB",
            f"{number(memory['peak_growth_bytes'] / mib)} / {number(memory['kv_bytes'] / mib)} / "
            f"{number(memory['activation_bytes'] / mib)}",
        ],
        [
            f"{shared['rows']} rows of one task ({shared['prefix_tokens']}-token prefix): prefix KiB held / one copy / a copy per row",
            f"{number(shared['prefix_bytes_held'] / 1024)} / {number(shared['one_copy_bytes'] / 1024)} / "
            f"{number(shared['copy_per_row_bytes'] / 1024)}",
        ],
        [
            f"decode pass at batch {decode['rows']}: paged / dense layout (one DynamicCache) ms",
            f"{number(decode['paged_pass_ms'])} / {number(decode['dense_pass_ms'])}",
        ],
        [
            f"the engine's whole decode step at batch {decode['rows']} (scheduling, sampling, text) ms",
            number(decode["engine_step_ms"]),
        ],
    ]
    return ReportTable("long prompts and the paged KV cache (same run)", ["measurement", "value"], rows)


def prompt_cache_table(section: Mapping[str, Any]) -> ReportTable:
    """The ``prompt-cache`` section as measurement / value rows."""
    spec, shared, ttft, chat = section["spec"], section["shared_system"], section["ttft"], section["chat"]
    users = f"{spec['rows']} users, a {spec['system_tokens']}-token system prompt + {spec['turn_tokens']}-token turns"
    rows = [
        [f"{users}: the turns alone s", number(shared["alone_wall_s"])],
        ["with the system prompt, fresh engine (computed once) s / x", _times(shared, "cold")],
        ["with the system prompt, cached s / x", _times(shared, "cached")],
        [
            "TTFT p50 one at a time: short prompt / with the cached system prompt s",
            f"{number(ttft['short_ttft_p50_s'])} / {number(ttft['cached_ttft_p50_s'])} ({number(ttft['ratio'])}x)",
        ],
        [
            f"chat of {spec['chat_turns']} turns: TTFT last / first turn, cached (uncached)",
            f"{number(chat['cached']['last_over_first'])} ({number(chat['uncached']['last_over_first'])})",
        ],
        ["prompts sharing nothing: throughput cache on / off", number(section["distinct"]["on_over_off"])],
        *(
            [
                f"{spec['rows']} rows of one task, {length}-token prefix / none, throughput",
                number(part["ratio"]),
            ]
            for length, part in section["task_prefix"].items()
        ),
    ]
    return ReportTable("prompt caching and shared heads (same run)", ["measurement", "value"], rows)


def _times(shared: Mapping[str, Any], name: str) -> str:
    return f"{number(shared[f'{name}_wall_s'])} / {number(shared[f'{name}_over_alone'])}x"


def scale_table(section: Mapping[str, Any]) -> ReportTable:
    """The ``scale`` section as measurement / value rows."""
    spec, traffic, startup = section["spec"], section["traffic"], section["startup"]
    rows = []
    for backend, uploads in section["uploads"].items():
        listing = section["listing"][backend]
        rows += [
            [
                f"{backend}: {spec['tasks']} uploads into one tenant, first / last {spec['batch']} per s",
                f"{number(uploads['first_per_s'])} / {number(uploads['last_per_s'])} "
                f"({number(uploads['last_over_first'])})",
            ],
            [
                f"{backend}: one page (100) at {spec['tasks']} tasks / at 100 tasks ms",
                f"{number(listing['page_ms_at_tasks'])} / {number(listing['page_ms_at_100'])} "
                f"({number(listing['ratio'])})",
            ],
        ]
    rows += [
        [
            f"Zipf(1.0) over {traffic['tasks']} tasks, the cache holding {traffic['budget_tasks']} / "
            "8 resident tok/s",
            f"{number(traffic['zipf_tokens_per_s'])} / {number(traffic['resident_tokens_per_s'])} "
            f"({number(traffic['ratio'])})",
        ],
        [
            f"start-up on {startup['tasks']} tasks over {startup['tenants']} tenants / on an empty store s",
            f"{number(startup['full_s'])} / {number(startup['empty_s'])} ({number(startup['ratio'])})",
        ],
    ]
    return ReportTable("many tasks per tenant (same run)", ["measurement", "value"], rows)
