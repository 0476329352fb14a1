"""A benchmark report on the terminal (rich tables) and on disk: ``report.json``, ``report.md`` (the
tables in Markdown), one CSV per table and one PNG per curve (matplotlib) in the output folder."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from server.benchmark.tables import (
    CURVE_AXES,
    SUMMARY_KEYS,
    long_prompt_table,
    markdown,
    number,
    prompt_cache_table,
    report_tables,
    scale_table,
    store_rows,
)

REPORT_FILES = (
    "report.json",
    "roofline.json",
    "report.md",
    "baselines.csv",
    "curve-*.csv",
    "curve-*.png",
    "http.*",
    "long-prompts.csv",
    "prompt-cache.csv",
    "scale.csv",
    "encoder-decoder.csv",
    "store.csv",
    "memory.csv",
    "targets.csv",
)


def write_report(report: Mapping[str, Any], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write JSON, CSVs and (with ``plots``: needs matplotlib) PNG plots; returns the files written.
    An earlier report's files in ``out_dir`` are removed first, so the folder holds one run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in REPORT_FILES:
        for stale in out_dir.glob(pattern):
            stale.unlink()
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2, default=str))
    written[1].write_text(markdown(report_tables(report)))
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
    if report.get("long_prompts"):
        rows = [{"measurement": m, "value": v} for m, v in long_prompt_table(report["long_prompts"]).rows]
        written.append(_write_csv(out_dir / "long-prompts.csv", rows))
    if report.get("prompt_cache"):
        rows = [{"measurement": m, "value": v} for m, v in prompt_cache_table(report["prompt_cache"]).rows]
        written.append(_write_csv(out_dir / "prompt-cache.csv", rows))
    if report.get("encoder_decoder"):
        rows = [{"system": name, **s} for name, s in report["encoder_decoder"]["systems"].items()]
        written.append(_write_csv(out_dir / "encoder-decoder.csv", rows))
    if report.get("scale"):
        rows = [{"measurement": m, "value": v} for m, v in scale_table(report["scale"]).rows]
        written.append(_write_csv(out_dir / "scale.csv", rows))
    if report.get("store"):
        written.append(_write_csv(out_dir / "store.csv", store_rows(report["store"])))
    if report.get("memory"):
        written.append(_write_csv(out_dir / "memory.csv", report["memory"]))
    if report.get("roofline"):
        written.append(out_dir / "roofline.json")
        written[-1].write_text(json.dumps(report["roofline"], indent=2))
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
        flat |= {f"{side}_{key}": row[side][key] for key in SUMMARY_KEYS}
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
    axes.set_xticks(xs, [number(x) for x in xs])
    axes.minorticks_off()


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """Every table of the report, then the targets with PASS / FAIL in colour."""
    for data in report_tables(report):
        table = Table(title=data.title)
        for i, column in enumerate(data.columns):
            table.add_column(column, justify="left" if i < data.text_columns else "right")
        for row in data.rows:
            table.add_row(*(_VERDICT_STYLE.get(cell, cell) for cell in row))
        console.print(table)


_VERDICT_STYLE = {"PASS": "[green]PASS[/]", "FAIL": "[bold red]FAIL[/]", "not run": "[dim]not run[/]"}
