"""The paper's claim, measured in miniature: ``python -m bench.quality.run`` (``make bench-quality``).

Li & Liang (2021) report that prefix-tuning, learning 0.1% of the parameters, is comparable to full
fine-tuning on table-to-text with the full data set and better with little data. This run repeats that
comparison on SmolLM2-135M-Instruct with an E2E-style data set (``e2e_data``): for each setting (full
data; low data) every method of ``methods.METHODS`` is trained with the same step budget, then the test
set is generated through the server — the base model and all prefix, soft-prompt and LoRA tasks on one
server, their requests in one stream so that batches mix tasks; the fully fine-tuned model folder on a
server of its own — and scored with BLEU (sacrebleu, several references) and slot coverage. Writes ``quality.json``,
``quality.csv``, ``quality.md`` and ``quality.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from prefix_client import Client

from bench.quality.e2e_data import Example, Splits, build_splits, few_shot_examples, write_jsonl
from bench.quality.evaluation import Outputs, System, evaluate
from bench.quality.measured import run_measured
from bench.quality.methods import INSTRUCTION, METHODS, NUM_VIRTUAL_TOKENS
from bench.quality.metrics import corpus_bleu, slot_coverage
from bench.quality.report import print_table, write_report
from server.model_source import DEFAULT_MODEL, resolve_model
from testing.server_process import ServerProcess

SERVER_ENV = {"PREFIX_SERVE_MAX_BATCH_SIZE": "64"}


@dataclass(frozen=True)
class Setting:
    name: str  # "full" or "low"
    train: tuple[Example, ...]
    epochs: int  # epochs that make the shared step budget on this many examples


def settings_of(splits: Splits, steps: int, batch_size: int) -> list[Setting]:
    result = []
    for name, train in (("full", splits.full), ("low", splits.low)):
        steps_per_epoch = -(-len(train) // batch_size)
        if steps % steps_per_epoch:
            raise ValueError(
                f"{steps} steps are not whole epochs of {len(train)} examples in batches of {batch_size}"
            )
        result.append(Setting(name, train, steps // steps_per_epoch))
    return result


def train_all(model: str, settings: Sequence[Setting], workdir: Path, batch_size: int) -> dict[str, dict]:
    """Train every method in every setting; returns ``{method/setting: training facts}``. A run already
    done in ``workdir`` with the same command (``runs.json``) is not repeated."""
    record = workdir / "runs.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    runs: dict[str, dict] = {}
    for setting in settings:
        data = workdir / f"train-{setting.name}.jsonl"
        write_jsonl(setting.train, data)
        for method in METHODS:
            if method.served == "prompted":
                continue
            key = f"{method.name}/{setting.name}"
            out = workdir / method.name / setting.name
            command = method.train_command(model, data, out, epochs=setting.epochs, batch_size=batch_size)
            if done.get(key, {}).get("command") == command:
                runs[key] = done[key]
                continue
            print(f"training {key}: {len(setting.train)} examples, {setting.epochs} epochs", flush=True)
            shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier, interrupted benchmark
            measured = run_measured(command, workdir / f"train-{method.name}-{setting.name}.log")
            summary = json.loads((out / "training.json").read_text())
            runs[key] = {
                "command": command,
                "out": str(out),
                "seconds": measured.seconds,
                "peak_rss_bytes": measured.peak_rss_bytes,
                "train_seconds": sum(epoch["seconds"] for epoch in summary["history"]),
                "trained_parameters": summary["trainable_parameters"],
                "steps": summary["steps"],
                "final_loss": summary["history"][-1]["train_loss"],
            }
            record.write_text(json.dumps({**done, **runs}, indent=2))
            print(f"  {measured.seconds:.0f} s, peak {measured.peak_rss_bytes / 2**30:.2f} GiB", flush=True)
    return runs


def prompted_messages(splits: Splits) -> list[dict[str, str]]:
    """The prompted base model's chat: the instruction, then three solved examples as turns."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for example in few_shot_examples(splits, k=3):
        messages += [
            {"role": "user", "content": example.mr_text},
            {"role": "assistant", "content": example.references[0]},
        ]
    return messages


def evaluate_all(
    model: str, splits: Splits, settings: Sequence[Setting], runs: dict[str, dict], workdir: Path
) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Every system's test outputs, and per server how long its evaluation took."""
    outputs: dict[str, list[str]] = {}
    timings: dict[str, dict] = {}
    shared = [System("prompted", chat=prompted_messages(splits))]
    with ServerProcess(
        model, (workdir / "store").as_uri(), env=SERVER_ENV, log_path=workdir / "server.log"
    ) as server:
        with Client(server.url) as client:
            for method in METHODS:
                for setting in settings:
                    if method.served == "task":
                        key = f"{method.name}/{setting.name}"
                        task = f"{method.name}-{setting.name}"
                        client.upload_prefix(task, Path(runs[key]["out"]) / method.upload)
                        shared.append(System(key, task_id=task))
        print(f"evaluating {len(shared)} systems on one server, {len(splits.test)} examples each", flush=True)
        _collect(evaluate(server.url, shared, splits.test), outputs, timings, "shared")
    for method in METHODS:
        for setting in settings:
            if method.served != "model":
                continue
            key = f"{method.name}/{setting.name}"
            folder = Path(runs[key]["out"]) / "model"
            print(f"evaluating {key} on its own server", flush=True)
            with ServerProcess(str(folder), (workdir / "store").as_uri(), env=SERVER_ENV) as server:
                _collect(evaluate(server.url, [System(key)], splits.test), outputs, timings, key)
    return outputs, timings


def _collect(result: Outputs, outputs: dict[str, list[str]], timings: dict[str, dict], server: str) -> None:
    outputs.update(result.texts)
    timings[server] = {"systems": list(result.texts), "requests": result.requests, "seconds": result.seconds}


def score(
    splits: Splits, settings: Sequence[Setting], runs: dict[str, dict], outputs: dict[str, list[str]]
) -> list[dict]:
    references = [example.references for example in splits.test]
    rows = []
    for setting in settings:
        for method in METHODS:
            key = "prompted" if method.served == "prompted" else f"{method.name}/{setting.name}"
            coverage = slot_coverage(splits.test, outputs[key])
            run = runs.get(key, {})
            rows.append(
                {
                    "setting": setting.name,
                    "train_examples": len(setting.train),
                    "method": method.name,
                    "label": method.label,
                    "lr": method.lr or None,
                    "bleu": corpus_bleu(outputs[key], references),
                    "slot_recall": coverage.slot_recall,
                    "slot_exact": coverage.exact,
                    "trained_parameters": run.get("trained_parameters", 0),
                    "train_seconds": run.get("train_seconds"),
                    "wall_seconds": run.get("seconds"),
                    "peak_rss_bytes": run.get("peak_rss_bytes"),
                    "final_train_loss": run.get("final_loss"),
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument(
        "--workdir", type=Path, help="keep the data, models and logs here (default: temporary)"
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full-size", type=int, default=480, help="training examples, full-data setting")
    parser.add_argument("--low-size", type=int, default=48, help="training examples, low-data setting")
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = str(resolve_model(DEFAULT_MODEL).path)
    splits = build_splits(
        args.seed, full_size=args.full_size, low_size=args.low_size, test_size=args.test_size
    )
    settings = settings_of(splits, args.steps, args.batch_size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefix-serve-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        write_jsonl(splits.test, workdir / "test.jsonl", all_references=True)
        runs = train_all(model, settings, workdir, args.batch_size)
        outputs, timings = evaluate_all(model, splits, settings, runs, workdir)
    rows = score(splits, settings, runs, outputs)
    report = {
        "model": DEFAULT_MODEL,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
        "sizes": {"full": len(splits.full), "low": len(splits.low), "test": len(splits.test)},
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
        "evaluation": timings,
        "samples": _samples(splits, outputs),
    }
    print_table(report)
    for path in write_report(report, args.out):
        print(f"wrote {path}")


def _samples(splits: Splits, outputs: dict[str, list[str]], count: int = 4) -> list[dict]:
    """The first test examples with every system's output, for the README and for reading."""
    return [
        {
            "mr": example.mr_text,
            "reference": example.references[0],
            "outputs": {k: v[i] for k, v in outputs.items()},
        }
        for i, example in enumerate(splits.test[:count])
    ]


if __name__ == "__main__":
    main()
