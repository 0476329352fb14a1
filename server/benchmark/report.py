"""A benchmark report on the terminal (rich tables) and on disk: ``report.json``, one CSV per table and
one PNG per curve (matplotlib) in the output folder."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CURVE_AXES = {  # curve name -> (x label, log-scaled x)
    "concurrency": ("concurrent clients", True),
    "prefix-length": ("virtual tokens per prefix", False),
    "tasks": ("distinct tasks in the mix", True),
    "cache-budget": ("working set / registry budget", True),
}
SUMMARY_COLUMNS = ("tokens_per_s", "p50_latency_s", "p99_latency_s", "p50_ttft_s", "p99_ttft_s", "requests")


def write_report(report: Mapping[str, Any], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write JSON, CSVs and (with ``plots``: needs matplotlib) PNG plots; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json"]
    written[0].write_text(json.dumps(report, indent=2, default=str))
    if report.get("baselines"):
        rows = [{"system": name, **summary} for name, summary in report["baselines"].items()]
        written.append(_write_csv(out_dir / "baselines.csv", rows))
    for name, points in report.get("curves", {}).items():
        written.append(_write_csv(out_dir / f"curve-{name}.csv", points))
        if plots:
            written.append(_plot_curve(out_dir / f"curve-{name}.png", name, points, _caption(report)))
    if report.get("http"):
        rows = [_flatten_http(row) for row in report["http"]]
        written.append(_write_csv(out_dir / "http.csv", rows))
        if plots:
            written.append(_plot_http(out_dir / "http.png", report["http"], _caption(report)))
    if report.get("memory"):
        written.append(_write_csv(out_dir / "memory.csv", report["memory"]))
    if report.get("targets"):
        written.append(_write_csv(out_dir / "targets.csv", report["targets"]))
    return written


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _flatten_http(row: Mapping[str, Any]) -> dict[str, Any]:
    flat = {"clients": row["clients"], "http_over_in_process": row["http_over_in_process"]}
    for side in ("http", "in_process"):
        flat |= {f"{side}_{key}": row[side][key] for key in SUMMARY_COLUMNS}
    return flat


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _caption(report: Mapping[str, Any]) -> str:
    """What a plot was measured on, for its title."""
    if report.get("mode") == "remote":
        return f"server at {report['url']}"
    s = report["settings"]
    return f"random {s['geometry']} model, {s['device']}, {s['dtype']}, {s['threads']} threads"


def _plot_curve(path: Path, name: str, points: Sequence[Mapping[str, Any]], caption: str) -> Path:
    plt = _pyplot()
    label, log_x = CURVE_AXES.get(name, (name, False))
    xs = [p["x"] for p in points]
    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    throughput.plot(xs, [p["tokens_per_s"] for p in points], marker="o")
    throughput.set(xlabel=label, ylabel="new tokens / s", title=f"throughput vs {label}", ylim=(0, None))
    for key, style in (("p50_latency_s", "o-"), ("p99_latency_s", "s--")):
        latency.plot(xs, [p[key] for p in points], style, label=key.split("_")[0])
    latency.set(xlabel=label, ylabel="request latency, s", title=f"latency vs {label}", ylim=(0, None))
    latency.legend()
    for axes in (throughput, latency):
        _x_ticks(axes, xs, log_x)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_http(path: Path, rows: Sequence[Mapping[str, Any]], caption: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(6, 4))
    clients = [row["clients"] for row in rows]
    for side, label in (("http", "over HTTP"), ("in_process", "in process")):
        axes.plot(clients, [row[side]["tokens_per_s"] for row in rows], marker="o", label=label)
    axes.set(xlabel="concurrent clients", ylabel="new tokens / s", title="HTTP vs in-process", ylim=(0, None))
    _x_ticks(axes, clients, log=True)
    axes.legend()
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _x_ticks(axes, xs: Sequence[float], log: bool) -> None:
    """Ticks at the measured points, labelled with their values."""
    if log:
        axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [_number(x) for x in xs])
    axes.minorticks_off()


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """Every table of the report, then the targets with PASS / FAIL."""
    if report.get("baselines"):
        table = _summary_table("systems (same run)", "system")
        for name, summary in report["baselines"].items():
            table.add_row(name, *_summary_cells(summary))
        console.print(table)
    for name, points in report.get("curves", {}).items():
        label, _ = CURVE_AXES.get(name, (name, False))
        table = _summary_table(f"curve: {name}", label)
        extra = [key for key in ("relative", "hit_rate") if points and key in points[0]]
        for key in extra:
            table.add_column(key.replace("_", " "), justify="right")
        for point in points:
            table.add_row(_number(point["x"]), *_summary_cells(point), *(_number(point[k]) for k in extra))
        console.print(table)
    if report.get("http"):
        table = Table(title="HTTP vs in-process (same run)")
        for column in (
            "clients",
            "HTTP tok/s",
            "in-process tok/s",
            "HTTP / in-process",
            "HTTP p50 s",
            "HTTP p99 s",
        ):
            table.add_column(column, justify="right")
        for row in report["http"]:
            h = row["http"]
            table.add_row(
                str(row["clients"]),
                _number(h["tokens_per_s"]),
                _number(row["in_process"]["tokens_per_s"]),
                _number(row["http_over_in_process"]),
                _number(h["p50_latency_s"]),
                _number(h["p99_latency_s"]),
            )
        console.print(table)
    if report.get("memory"):
        console.print(_memory_table(report["memory"]))
    if report.get("targets"):
        table = Table(title="targets")
        for column in ("target", "measured", "threshold", "verdict"):
            table.add_column(column, justify="left" if column == "target" else "right")
        for target in report["targets"]:
            style = {"PASS": "green", "FAIL": "bold red"}.get(target["verdict"], "dim")
            value = "-" if target["value"] is None else _number(target["value"])
            table.add_row(
                target["name"], value, f"≥ {target['threshold']:g}", f"[{style}]{target['verdict']}[/]"
            )
        console.print(table)


def _summary_table(title: str, first: str) -> Table:
    table = Table(title=title)
    table.add_column(first)
    for column in ("tok/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s", "requests"):
        table.add_column(column, justify="right")
    return table


def _summary_cells(summary: Mapping[str, Any]) -> list[str]:
    return [_number(summary[key]) for key in SUMMARY_COLUMNS]


def _memory_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="prefix memory (keys + values of every layer)")
    for column in (
        "model",
        "layers x kv heads x head_dim",
        "dtype",
        "bytes / virtual token",
        "20-token prefix",
        "share of weights",
        "prefixes in budget",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(
            row["model"],
            row["geometry"],
            row["dtype"],
            f"{row['bytes_per_virtual_token']:,}",
            _bytes(row["bytes_per_prefix"]),
            f"{row['prefix_share_of_weights']:.4%}",
            f"{row['prefixes_in_budget']:,}",
        )
    return table


def _number(value: float) -> str:
    """Integers with thousands separators; ratios and seconds with 3 decimals; throughput with 1."""
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")
