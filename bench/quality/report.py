"""The quality benchmark's report: a table on the terminal, and JSON, CSV, Markdown and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = (  # (heading, row key, format)
    ("setting", "setting", "{}"),
    ("method", "label", "{}"),
    ("BLEU", "bleu", "{:.1f}"),
    ("slots realised", "slot_recall", "{:.1%}"),
    ("all slots", "slot_exact", "{:.1%}"),
    ("trained params", "trained_parameters", "{:,}"),
    ("train s", "train_seconds", "{:.0f}"),
    ("peak RSS GiB", "peak_rss_gib", "{:.2f}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    row = {**row, "peak_rss_gib": row["peak_rss_bytes"] / 2**30 if row["peak_rss_bytes"] else None}
    row["setting"] = f"{row['setting']} ({row['train_examples']})"
    return ["–" if row[key] is None else form.format(row[key]) for _, key, form in COLUMNS]


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(heading for heading, _, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report["rows"]]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    table = Table(
        title=f"quality: {report['model']}, {report['steps']} steps of {report['batch_size']} per method"
    )
    for heading, _, _ in COLUMNS:
        table.add_column(heading)
    for row in report["rows"]:
        table.add_row(*_cells(row))
    Console(width=max(Console().width, 150)).print(table)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "quality.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    csv_path = out_dir / "quality.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    md_path = out_dir / "quality.md"
    md_path.write_text(markdown_table(report))
    return [json_path, csv_path, md_path, _plot(report, out_dir / "quality.png")]


def _plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in report["rows"]))
    methods = list(dict.fromkeys(row["label"] for row in report["rows"]))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(settings)
    for axis, key, title in ((axes[0], "bleu", "BLEU"), (axes[1], "slot_exact", "outputs with every slot")):
        for i, setting in enumerate(settings):
            values = {row["label"]: row[key] for row in report["rows"] if row["setting"] == setting}
            size = next(row["train_examples"] for row in report["rows"] if row["setting"] == setting)
            positions = [m + (i - (len(settings) - 1) / 2) * width for m in range(len(methods))]
            axis.barh(
                positions, [values[label] for label in methods], height=width, label=f"{setting} ({size})"
            )
        axis.set_yticks(range(len(methods)), methods, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title)
        axis.grid(axis="x", alpha=0.3)
    axes[1].set_yticks(range(len(methods)), [""] * len(methods))
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].legend(title="training examples", fontsize=8)
    figure.suptitle(
        f"{report['model']}: E2E-style table-to-text, {report['steps']} steps of {report['batch_size']} each",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
