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
from server.cli.argtypes import positive_int


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


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return chosen


def _listed(values: tuple) -> str:
    return ",".join(f"{v:g}" for v in values)


def _span(bounds: tuple[int, int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"


def register(commands: argparse._SubParsersAction) -> None:
    default = BenchSettings()
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency against PEFT and the other baselines, in one run",
        description=(
            "Build a randomly initialised Llama of a named geometry and measure, in one run: the engine "
            "against one task, PEFT one at a time, PEFT grouped by task and static batching; curves over "
            "concurrency, distinct tasks, prefix length and cache budget; HTTP against in-process; prefix "
            "memory. With --url, measure a running server instead (its concurrency curve). Prints tables "
            "with PASS/FAIL per target and writes report.json, CSVs and PNG plots to --out."
        ),
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest"),
        metavar="DIR",
        help="where the report's files go (default: bench/results/latest)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="every section on a tiny model with small workloads: a smoke run (default: off)",
    )
    bench.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target fails (default: off)"
    )
    bench.add_argument(
        "--sections",
        type=_sections,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; with --url the "
        "concurrency curve always runs, and memory if listed)",
    )
    model = bench.add_argument_group("model (in process)")
    model.add_argument(
        "--geometry", choices=list(GEOMETRIES), help=f"the random model's shape (default: {default.geometry})"
    )
    model.add_argument("--device", help=f"cpu, cuda, cuda:1 ... (default: {default.device})")
    model.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help=f"(default: {default.dtype})"
    )
    model.add_argument("--threads", type=positive_int, help=f"torch CPU threads (default: {default.threads})")
    work = bench.add_argument_group("workload")
    work.add_argument(
        "--requests",
        type=positive_int,
        help="requests per run. The baselines and the tasks, prefix-length and cache-budget curves send "
        "this many; a point of the in-process concurrency curve with C clients sends 2C-8C (this many "
        "where it falls in that range); with --url every point sends this many, or one per client where "
        f"that is more, for at least --min-seconds (default: {default.workload.requests})",
    )
    work.add_argument(
        "--prompt-tokens",
        type=_range,
        metavar="MIN-MAX",
        help="prompt lengths in tokens, uniform; with --url in the server's tokens, calibrated with a few "
        f"requests first (default: {_span(default.workload.prompt_tokens)})",
    )
    work.add_argument(
        "--new-tokens",
        type=_range,
        metavar="MIN-MAX",
        help=f"output lengths, uniform (default: {_span(default.workload.new_tokens)})",
    )
    work.add_argument(
        "--concurrency",
        type=positive_int,
        help="closed-loop clients of the baselines and of the tasks, prefix-length and cache-budget "
        f"curves (default: {default.concurrency})",
    )
    work.add_argument(
        "--tasks",
        type=positive_int,
        help="distinct tasks in the baselines' mix; with --url, the most of the caller's tasks used "
        f"(default: {default.tasks})",
    )
    work.add_argument(
        "--rate",
        type=_positive_number,
        dest="arrival_rate",
        help="requests/s of the open-loop baselines (default: 70%% of the measured capacity)",
    )
    work.add_argument(
        "--repeats",
        type=positive_int,
        help=f"runs per measurement, the median reported (default: {default.repeats})",
    )
    curves = bench.add_argument_group("curves")
    curves.add_argument(
        "--concurrency-curve",
        type=_numbers(int, 1),
        metavar="N,N,...",
        help=f"clients of each point, in process or with --url (default: {_listed(default.concurrency_curve)})",
    )
    curves.add_argument(
        "--tasks-curve",
        type=_numbers(int, 1),
        metavar="N,N,...",
        help=f"distinct tasks of each point (default: {_listed(default.tasks_curve)})",
    )
    curves.add_argument(
        "--prefix-curve",
        type=_numbers(int, 0),
        metavar="N,N,...",
        help=f"virtual tokens per prefix of each point (default: {_listed(default.prefix_curve)})",
    )
    curves.add_argument(
        "--cache-curve",
        type=_numbers(float, 0.01),
        metavar="X,X,...",
        help=f"working set / budget of each point (default: {_listed(default.cache_curve)})",
    )
    curves.add_argument(
        "--cache-tasks",
        type=positive_int,
        help=f"the cache curve's working set, in tasks (default: {default.cache_tasks})",
    )
    curves.add_argument(
        "--http-concurrency",
        type=_numbers(int, 1),
        metavar="N,N,...",
        help=f"clients of each HTTP / in-process point (default: {_listed(default.http_concurrency)})",
    )
    curves.add_argument(
        "--store-samples",
        type=positive_int,
        help=f"loads on a miss timed per store (default: {default.store_samples})",
    )
    curves.add_argument(
        "--redis-url",
        help="also measure the Redis store at this URL; keys of tenant 'bench' are written "
        "(default: none, the filesystem store only)",
    )
    curves.add_argument(
        "--memory-budget-gib",
        type=_positive_number,
        help=f"budget of the memory table (default: {default.memory_budget_bytes / (1 << 30):g})",
    )
    remote = bench.add_argument_group("a running server")
    remote.add_argument(
        "--url",
        help="measure the server at this URL over HTTP instead: its concurrency curve "
        "(default: none, build a model and measure in process)",
    )
    remote.add_argument(
        "--api-key",
        default=os.environ.get("PREFIX_SERVE_API_KEY"),
        help="the key --url's requests send (default: env PREFIX_SERVE_API_KEY, else none)",
    )
    remote.add_argument(
        "--task-ids",
        type=lambda t: tuple(s for s in t.split(",") if s),
        metavar="A,B,...",
        help="the tasks the requests go to, round-robin (default: the caller's tasks, at most --tasks; "
        "the base model alone if it has none)",
    )
    remote.add_argument(
        "--base-model",
        action="store_true",
        help="send requests to the base model (no prefix) too: alone, or in the mix with --task-ids "
        "(default: off)",
    )
    remote.add_argument(
        "--min-seconds",
        type=_non_negative_number,
        default=0.0,
        metavar="S",
        help="keep each point's clients sending until S seconds have passed, even past --requests "
        "(default: 0, the request count alone)",
    )
    remote.add_argument(
        "--max-retry-wait",
        type=_non_negative_number,
        default=30.0,
        metavar="S",
        help="a request answered 429 is retried after its Retry-After, until its waits would pass S "
        "seconds; then it counts as refused. 429s are counted in the report (default: 30)",
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

        from server.benchmark.remote import RemoteTarget
        from server.benchmark.served import ServerRefused

        target = RemoteTarget(
            url=args.url,
            api_key=args.api_key,
            task_ids=args.task_ids or (),
            base_model=args.base_model,
            min_seconds=args.min_seconds,
            max_retry_wait_s=args.max_retry_wait,
        )
        try:
            report = run_remote(settings, target, console.log)
        except ServerRefused as refused:  # one line, however wide the terminal
            console.print(f"the server refused: {refused}", style="red", soft_wrap=True, markup=False)
            return 1
        except httpx.TransportError as error:
            console.print(f"cannot reach {args.url}: {error!r}", style="red", soft_wrap=True)
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
