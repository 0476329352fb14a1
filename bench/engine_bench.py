"""Engine benchmark: mixed-task continuous batching against its baselines, all measured in one run.

    python -m bench.engine_bench --out bench/results/engine.json

A randomly initialised Llama-shaped model (hidden 512, 8 layers, ~25M parameters in its layers),
float32 on the CPU; a closed loop of ``--concurrency`` clients sends ``--requests`` requests (prompts
16-64 tokens, 32 new tokens, tasks round-robin over 8 prefixes of 4-32 virtual tokens). Each system
serves the same requests; every number is reported as a ratio to the mixed-task engine:

  one-prefix   the same workload with every request on ONE prefix, through the engine
  peft-serial  PEFT one request at a time (prefix cache from ``PeftModel.get_prompt``, KV-cached decode)
  peft-grouped PEFT one batch per task, tasks one after another (the best a PEFT user can do)
  static       this engine admitting new requests only into an empty batch (static batching), on a
               second workload whose max_new_tokens vary 8-128, where it is compared on p50 latency
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from prefix_store import ModelGeometry, Prefix
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig

PREFIX_LENGTHS = [4, 8, 12, 16, 20, 24, 28, 32]


@dataclass
class Timeline:
    """When each request was submitted, produced its first token, and finished."""

    submitted: dict[str, float] = field(default_factory=dict)
    first_token: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    started: float = 0.0
    ended: float = 0.0

    def record(self, events: list[tuple[str, int, bool]]) -> int:
        """Note a system's events (request id, new tokens, finished) as of now; returns how many finished."""
        now, finished_now = time.perf_counter(), 0
        for request_id, new_tokens, finished in events:
            self.tokens += new_tokens
            if new_tokens:
                self.first_token.setdefault(request_id, now)
            if finished:
                self.finished[request_id] = now
                finished_now += 1
        return finished_now

    def summary(self) -> dict[str, float]:
        latency = sorted(self.finished[r] - self.submitted[r] for r in self.finished)
        ttft = sorted(self.first_token[r] - self.submitted[r] for r in self.first_token)
        return {
            "tokens_per_s": self.tokens / (self.ended - self.started),
            "p50_latency_s": _percentile(latency, 50),
            "p99_latency_s": _percentile(latency, 99),
            "p50_ttft_s": _percentile(ttft, 50),
            "p99_ttft_s": _percentile(ttft, 99),
            "wall_s": self.ended - self.started,
        }


def _percentile(values: Sequence[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


class System:
    """Something that serves requests: ``submit`` queues one, ``advance`` does a unit of work and
    returns ``(request_id, new_tokens, finished)`` events."""

    def submit(self, request: GenerationRequest) -> None: ...

    def advance(self) -> list[tuple[str, int, bool]]: ...


class EngineSystem(System):
    def __init__(self, base: BaseModel, *, static: bool, max_batch_size: int) -> None:
        config = SchedulerConfig(max_batch_size=max_batch_size, max_batch_tokens=1 << 20, max_waiting=1 << 16)
        self.core = EngineCore(base, config, static_batching=static)

    def submit(self, request: GenerationRequest) -> None:
        self.core.add_request(request)

    def advance(self) -> list[tuple[str, int, bool]]:
        return [(o.request_id, len(o.token_ids), o.finish_reason is not None) for o in self.core.step()]


class PeftSystem(System):
    """A PEFT user's serving loop: the base model with PEFT's prefix cache, one batch at a time."""

    def __init__(self, model: LlamaForCausalLM, peft_models: dict[str, object], *, grouped: bool) -> None:
        self.model, self.peft_models, self.grouped = model, peft_models, grouped
        self.queue: deque[GenerationRequest] = deque()

    def submit(self, request: GenerationRequest) -> None:
        self.queue.append(request)

    def advance(self) -> list[tuple[str, int, bool]]:
        if not self.grouped:
            return self._run_batch([self.queue.popleft()])
        by_task: dict[str | None, list[GenerationRequest]] = defaultdict(list)
        while self.queue:
            request = self.queue.popleft()
            by_task[request.task_id].append(request)
        events = []
        for group in by_task.values():
            events += self._run_batch(group)
        return events

    @torch.inference_mode()
    def _run_batch(self, group: list[GenerationRequest]) -> list[tuple[str, int, bool]]:
        peft_model = self.peft_models[group[0].task_id]
        batch_size, longest = len(group), max(len(r.prompt_ids) for r in group)
        cache: DynamicCache = peft_model.get_prompt(batch_size=batch_size)
        prefix_length = cache.get_seq_length()
        device = self.model.device
        input_ids = torch.zeros(batch_size, longest, dtype=torch.long, device=device)
        mask = torch.zeros(batch_size, prefix_length + longest, dtype=torch.long, device=device)
        mask[:, :prefix_length] = 1
        for i, r in enumerate(group):  # left padding, as a PEFT user batches prompts
            input_ids[i, longest - len(r.prompt_ids) :] = torch.tensor(list(r.prompt_ids))
            mask[i, prefix_length + longest - len(r.prompt_ids) :] = 1
        steps = max(r.max_new_tokens for r in group)
        for _ in range(steps):
            out = self.model(
                input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1
            )
            cache = out.cache
            input_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.long, device=device)], dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return [(r.request_id, r.max_new_tokens, True) for r in group]


def closed_loop(system: System, requests: Sequence[GenerationRequest], concurrency: int) -> Timeline:
    """``concurrency`` clients, each sending its next request when its previous one finishes."""
    timeline, pending, in_flight = Timeline(), deque(requests), 0
    timeline.started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            request = pending.popleft()
            timeline.submitted[request.request_id] = time.perf_counter()
            system.submit(request)
            in_flight += 1
        in_flight -= timeline.record(system.advance())
    timeline.ended = time.perf_counter()
    return timeline


def open_loop(system: System, requests: Sequence[GenerationRequest], rate: float, seed: int = 3) -> Timeline:
    """Requests arrive as a Poisson process of ``rate`` per second, whatever the system is doing."""
    rng = random.Random(seed)
    timeline, in_flight, arrival = Timeline(), 0, 0.0
    arrivals = deque()
    for request in requests:
        arrival += rng.expovariate(rate)
        arrivals.append((arrival, request))
    timeline.started = start = time.perf_counter()
    while arrivals or in_flight:
        now = time.perf_counter() - start
        while arrivals and arrivals[0][0] <= now:
            at, request = arrivals.popleft()
            timeline.submitted[request.request_id] = start + at
            system.submit(request)
            in_flight += 1
        if not in_flight:
            time.sleep(max(0.0, arrivals[0][0] - now))
            continue
        in_flight -= timeline.record(system.advance())
    timeline.ended = time.perf_counter()
    return timeline


def median_run(runs: Sequence[Timeline]) -> Timeline:
    """Of repeated runs of one system, the one with the median throughput (machines are noisy)."""
    ranked = sorted(runs, key=lambda t: t.tokens / (t.ended - t.started))
    return ranked[len(ranked) // 2]


GEOMETRIES = {  # Llama-shaped: hidden, layers, heads, kv heads, MLP width
    "tiny": (128, 2, 4, 2, 344),
    "small": (512, 8, 8, 4, 1376),  # ~25M parameters in its layers: the CPU benchmark
    "llama-1b": (2048, 16, 32, 8, 8192),
    "llama-8b": (4096, 32, 32, 8, 14336),
}


def build_model(
    seed: int,
    geometry: str = "small",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.02,
) -> tuple[LlamaForCausalLM, BaseModel]:
    """A randomly initialised Llama-shaped model of a named geometry, built directly on ``device`` in ``dtype``."""
    tokenizer = build_demo_tokenizer()
    hidden, layers, heads, kv_heads, mlp = GEOMETRIES[geometry]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default_dtype)
    base = BaseModel(
        model_id=f"bench-{geometry}",
        model=model,
        tokenizer=tokenizer,
        geometry=ModelGeometry.from_config(config),
        device=torch.device(device),
        dtype=dtype,
        max_positions=config.max_position_embeddings,
        eos_token_ids=frozenset(),
    )
    return model, base


def build_tasks(
    model: LlamaForCausalLM, lengths: Sequence[int]
) -> tuple[dict[str, object], dict[str, Prefix]]:
    """PEFT prefix-tuning models over the same base, one per length, and the same prefixes in the engine's form."""
    peft_models, prefixes = {}, {}
    for i, length in enumerate(lengths):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(
            model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
        )
        peft_model.prompt_encoder.to(model.device)
        peft_model.eval()
        cache = peft_model.get_prompt(batch_size=1)
        prefixes[f"task{i}"] = Prefix(
            keys=torch.stack([layer.keys[0] for layer in cache.layers]).contiguous(),  # [L, H, P, D]
            values=torch.stack([layer.values[0] for layer in cache.layers]).contiguous(),
        ).to(model.device, model.dtype)
        peft_models[f"task{i}"] = peft_model
    return peft_models, prefixes


def workload(
    prefixes: dict[str, Prefix], n: int, *, seed: int, new_tokens: Callable[[random.Random], int], vocab: int
) -> list[GenerationRequest]:
    rng = random.Random(seed)
    tasks = sorted(prefixes)
    return [
        GenerationRequest(
            request_id=f"r{i}",
            prompt_ids=[rng.randrange(2, vocab) for _ in range(rng.randint(16, 64))],
            prefix=prefixes[tasks[i % len(tasks)]],
            sampling=SamplingParams(),
            max_new_tokens=new_tokens(rng),
            ignore_eos=True,
            task_id=tasks[i % len(tasks)],
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system; the median is reported")
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, base = build_model(
        seed=0, geometry=args.geometry, device=args.device, dtype=getattr(torch, args.dtype)
    )
    peft_models, prefixes = build_tasks(model, PREFIX_LENGTHS)
    (mean_prefix,) = build_tasks(model, [round(statistics.mean(PREFIX_LENGTHS))])[1].values()
    vocab = model.config.vocab_size
    mixed = workload(prefixes, args.requests, seed=1, new_tokens=lambda _: 32, vocab=vocab)
    # the same requests on one prefix of the mixed prefixes' mean length: the same prefix tokens in all
    one_task = [replace(r, prefix=mean_prefix, task_id="mean") for r in mixed]
    varied = workload(
        prefixes, args.requests, seed=2, new_tokens=lambda rng: rng.randint(8, 128), vocab=vocab
    )

    def engine(static: bool = False) -> EngineSystem:
        return EngineSystem(base, static=static, max_batch_size=args.concurrency)

    closed_loop(engine(), mixed[: args.concurrency], args.concurrency)  # warm-up
    systems: dict[str, Callable[[], Timeline]] = {
        "engine-mixed": lambda: closed_loop(engine(), mixed, args.concurrency),
        "engine-one-prefix": lambda: closed_loop(engine(), one_task, args.concurrency),
        "peft-serial": lambda: closed_loop(
            PeftSystem(model, peft_models, grouped=False), mixed, args.concurrency
        ),
        "peft-grouped": lambda: closed_loop(
            PeftSystem(model, peft_models, grouped=True), mixed, args.concurrency
        ),
        "engine-varied": lambda: closed_loop(engine(), varied, args.concurrency),
        "static-varied": lambda: closed_loop(engine(static=True), varied, args.concurrency),
    }
    repeated: dict[str, list[Timeline]] = defaultdict(list)
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every system alike
        for name, run in systems.items():
            repeated[name].append(run())
    runs = {name: median_run(timelines) for name, timelines in repeated.items()}
    # open loop at 70% of the continuous engine's measured capacity: a server that is busy, not saturated
    rate = (
        0.7
        * runs["engine-varied"].summary()["tokens_per_s"]
        / statistics.mean(r.max_new_tokens for r in varied)
    )
    runs["engine-varied-open"] = open_loop(engine(), varied, rate)
    runs["static-varied-open"] = open_loop(engine(static=True), varied, rate)
    results = {name: timeline.summary() for name, timeline in runs.items()}
    mixed_tps = results["engine-mixed"]["tokens_per_s"]
    ratios = {
        "mixed / one-prefix throughput (target >= 0.95)": mixed_tps
        / results["engine-one-prefix"]["tokens_per_s"],
        "mixed / peft-serial throughput (target >= 5)": mixed_tps / results["peft-serial"]["tokens_per_s"],
        "mixed / peft-grouped throughput (target >= 1.5)": mixed_tps
        / results["peft-grouped"]["tokens_per_s"],
        "static / continuous p50 latency, varied lengths (target > 1)": results["static-varied"][
            "p50_latency_s"
        ]
        / results["engine-varied"]["p50_latency_s"],
        "static / continuous p50 latency, varied, open loop at 70% load": results["static-varied-open"][
            "p50_latency_s"
        ]
        / results["engine-varied-open"]["p50_latency_s"],
    }
    print_report(results, ratios, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "results": results, "ratios": ratios}, indent=2))
    print(f"\nwrote {args.out}")


def print_report(
    results: dict[str, dict[str, float]], ratios: dict[str, float], args: argparse.Namespace
) -> None:
    print(
        f"{args.geometry} geometry on {args.device} in {args.dtype}, {args.requests} requests, "
        f"{args.concurrency} concurrent clients, {args.threads} CPU threads, "
        f"median of {args.repeats} runs"
    )
    header = (
        f"{'system':<20}{'tok/s':>9}{'p50 lat s':>11}{'p99 lat s':>11}{'p50 TTFT s':>12}{'p99 TTFT s':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<20}{r['tokens_per_s']:>9.1f}{r['p50_latency_s']:>11.3f}{r['p99_latency_s']:>11.3f}"
            f"{r['p50_ttft_s']:>12.3f}{r['p99_ttft_s']:>12.3f}"
        )
    print()
    for name, value in ratios.items():
        print(f"{name:<66}{value:>8.2f}")


if __name__ == "__main__":
    main()
