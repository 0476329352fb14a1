"""``prefix-serve bench``: the performance report (see ``server.benchmark``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from server.benchmark.settings import GEOMETRIES, QUICK, SECTIONS, BenchSettings


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


def _numbers(kind: type, minimum: float) -> Callable[[str], tuple]:
    """A comma-separated list of numbers, each at least ``minimum``."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if any(not v >= minimum for v in values):  # `not >=` also refuses nan
            raise argparse.ArgumentTypeError(f"expected numbers >= {minimum:g}, got {text!r}")
        return values

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return chosen


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency against PEFT and the other baselines, in one run",
        description=(
            "Build a randomly initialised Llama of a named geometry and measure, in one run: the engine "
            "against one task, PEFT one at a time, PEFT grouped by task and static batching; curves over "
            "concurrency, distinct tasks, prefix length and cache budget; HTTP against in-process; prefix "
            "memory. With --url, measure a running server instead. Prints tables with PASS/FAIL per "
            "target and writes report.json, CSVs and PNG plots to --out."
        ),
    )
    bench.add_argument("--out", type=Path, default=Path("bench/results/latest"), metavar="DIR")
    bench.add_argument("--quick", action="store_true", help="every section on a tiny model: a smoke run")
    bench.add_argument("--check", action="store_true", help="exit with status 1 if a target fails")
    bench.add_argument("--sections", type=_sections, help=f"comma-separated subset of {','.join(SECTIONS)}")
    model = bench.add_argument_group("model")
    model.add_argument("--geometry", choices=list(GEOMETRIES), help="(small)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (cpu)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="(float32)")
    model.add_argument("--threads", type=_positive, help="torch CPU threads (2)")
    work = bench.add_argument_group("workload")
    work.add_argument("--requests", type=_positive, help="requests per run (48)")
    work.add_argument(
        "--prompt-tokens", type=_range, metavar="MIN-MAX", help="prompt lengths, uniform (16-64)"
    )
    work.add_argument("--new-tokens", type=_range, metavar="MIN-MAX", help="output lengths, uniform (32)")
    work.add_argument("--concurrency", type=_positive, help="closed-loop clients of the baselines (16)")
    work.add_argument("--tasks", type=_positive, help="distinct tasks in the baselines' mix (8)")
    work.add_argument(
        "--rate", type=_positive_number, dest="arrival_rate", help="open-loop requests/s (70%% of capacity)"
    )
    work.add_argument("--repeats", type=_positive, help="runs per measurement, median reported (3)")
    curves = bench.add_argument_group("curves")
    curves.add_argument(
        "--concurrency-curve", type=_numbers(int, 1), metavar="N,N,...", help="(1,2,4,8,16,32,64)"
    )
    curves.add_argument("--tasks-curve", type=_numbers(int, 1), metavar="N,N,...", help="(1,8,64,512)")
    curves.add_argument("--prefix-curve", type=_numbers(int, 0), metavar="N,N,...", help="(0,8,16,32,64,128)")
    curves.add_argument(
        "--cache-curve",
        type=_numbers(float, 0.01),
        metavar="X,X,...",
        help="working set / budget (0.5,1,2,4)",
    )
    curves.add_argument("--cache-tasks", type=_positive, help="the cache curve's working set, in tasks (64)")
    curves.add_argument("--http-concurrency", type=_numbers(int, 1), metavar="N,N,...", help="(1,4,16,32)")
    curves.add_argument("--store-samples", type=_positive, help="loads on a miss timed per store (100)")
    curves.add_argument(
        "--redis-url", help="also measure the Redis store at this URL (keys of tenant 'bench' are written)"
    )
    curves.add_argument("--memory-budget-gib", type=_positive_number, help="budget of the memory table (4)")
    remote = bench.add_argument_group("a running server")
    remote.add_argument("--url", help="measure this server over HTTP instead (its concurrency curve)")
    remote.add_argument(
        "--api-key", default=os.environ.get("PREFIX_SERVE_API_KEY"), help="(env PREFIX_SERVE_API_KEY)"
    )
    remote.add_argument(
        "--task-ids", type=lambda t: [s for s in t.split(",") if s], help="(the caller's tasks)"
    )
    bench.set_defaults(handler=run)


def settings_from(args: argparse.Namespace) -> BenchSettings:
    """Defaults, then ``--quick``'s, then every option given."""
    settings = replace(BenchSettings(), **QUICK) if args.quick else BenchSettings()
    given = {
        f.name: getattr(args, f.name)
        for f in fields(BenchSettings)
        if getattr(args, f.name, None) is not None
    }
    if args.memory_budget_gib is not None:
        given["memory_budget_bytes"] = int(args.memory_budget_gib * (1 << 30))
    workload = {
        name: getattr(args, name)
        for name in ("requests", "prompt_tokens", "new_tokens")
        if getattr(args, name) is not None
    }
    return replace(settings, **given, workload=replace(settings.workload, **workload))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    settings = settings_from(args)
    console = Console(width=None if sys.stdout.isatty() else 140)
    if not args.url and "baselines" in settings.sections and importlib.util.find_spec("peft") is None:
        console.print("the PEFT baselines need peft: pip install 'prefix-serve[bench]'", style="red")
        return 2
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        console.print(
            "matplotlib is not installed, so no plots: pip install 'prefix-serve[bench]'", style="yellow"
        )

    from server.benchmark.report import print_report, write_report
    from server.benchmark.suite import device_problem, run_in_process, run_remote

    if args.url:
        import httpx

        from server.benchmark.served import ServerRefused

        try:
            report = run_remote(settings, args.url, args.api_key, args.task_ids, console.log)
        except ServerRefused as refused:
            console.print(f"the server refused: {refused}", style="red")
            return 1
        except httpx.TransportError as error:
            console.print(f"cannot reach {args.url}: {error!r}", style="red")
            return 1
    else:
        if problem := device_problem(settings.device):
            console.print(problem, style="red")
            return 2
        report = run_in_process(settings, console.log)
    print_report(report, console)
    written = write_report(report, args.out, plots=plots)
    console.print(f"wrote {len(written)} files to {args.out}/")
    failed = [t["name"] for t in report.get("targets", []) if t["verdict"] == "FAIL"]
    return 1 if args.check and failed else 0
