"""What one ``prefix-serve bench`` run measures, and on what (no torch here: the CLI parses options without it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class WorkloadSpec:
    """Requests with prompt and output lengths drawn uniformly from inclusive ranges; seeded."""

    requests: int = 48
    prompt_tokens: tuple[int, int] = (16, 64)
    new_tokens: tuple[int, int] = (32, 32)
    seed: int = 1

    def for_clients(self, clients: int) -> WorkloadSpec:
        """The workload of a closed loop of ``clients``: 2-8 requests per client (``requests`` where it
        falls in that range), so that low concurrency stays short and high concurrency reaches steady state."""
        return replace(self, requests=max(2 * clients, min(self.requests, 8 * clients)))


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that set a Llama model's cost."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


GEOMETRIES = {
    "tiny": LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, mlp=344),
    "small": LlamaShape(hidden=512, layers=8, heads=8, kv_heads=4, mlp=1376),  # ~25M parameters: the CPU run
    "llama-1b": LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192),
    "llama-8b": LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336),
}


@dataclass(frozen=True)
class LongPromptSpec:
    """The ``long-prompts`` section's workload (``server.benchmark.long_prompts``)."""

    short_requests: int = 15
    short_tokens: int = 41
    long_tokens: int = 1601
    new_tokens: int = 16
    joining_tokens: int = 2000  # the prompt that joins decoding rows, and the memory part's request
    shared_rows: int = 16
    shared_prefix_tokens: int = 32
    decode_rows: int = 16


@dataclass(frozen=True)
class PromptCacheSpec:
    """The ``prompt-cache`` section's workload (``server.benchmark.prompt_cache``)."""

    rows: int = 16  # clients sharing the system prompt; rows of one task
    system_tokens: int = 1594  # 1,636 tokens with a user turn, as in the chat
    turn_tokens: int = 42
    new_tokens: int = 16
    chat_turns: int = 8
    prefix_tokens: tuple[int, ...] = (200, 1600)


@dataclass(frozen=True)
class ScaleSpec:
    """The ``scale`` section's workload (``server.benchmark.scale``)."""

    tasks: int = 10_000  # uploaded into one tenant; the traffic's tasks
    batch: int = 1000  # uploads per timed batch: the first batch's rate is compared with the last's
    prefix_tokens: int = 1  # virtual tokens of each task (10,000 of the small model: 160 MB)
    requests: int = 256  # of the traffic runs
    startup_tasks: int = 100_000  # the store the server starts on
    startup_tenants: int = 10


SECTIONS = (
    "baselines",
    "concurrency",
    "tasks",
    "prefix-length",
    "cache-budget",
    "http",
    "long-prompts",
    "prompt-cache",
    "lora",
    "scale",
    "encoder-decoder",
    "store",
    "memory",
    "roofline",
)


@dataclass(frozen=True)
class RooflineSpec:
    """The ``roofline`` section's runs (``server.benchmark.roofline``)."""

    batches: tuple[int, ...] = (1, 16, 64)
    prompt_tokens: int = 128
    prefix_tokens: int = 24  # rows' prefixes: 0, a third, two thirds and all of it, in turn
    warmup_steps: int = 3
    steps: int = 16  # decode steps timed per batch (the median counts)
    copy_mib: int = 256  # the device-to-device copy that measures the bandwidth


@dataclass(frozen=True)
class BenchSettings:
    geometry: str = "small"  # a name in GEOMETRIES
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2  # torch CPU threads
    repeats: int = 3  # runs per measurement; the median is reported
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    concurrency: int = 16  # clients of the baselines and of the tasks / prefix / cache curves
    tasks: int = 8  # distinct tasks in the baselines' mix
    arrival_rate: float | None = None  # requests/s of the open-loop runs; None: 70% of measured capacity
    concurrency_curve: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    tasks_curve: tuple[int, ...] = (1, 8, 64, 512)
    prefix_curve: tuple[int, ...] = (0, 8, 16, 32, 64, 128)
    curve_prefix_tokens: int = 20  # the prefix length of the tasks and cache-budget curves
    cache_curve: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # working set / registry budget
    cache_tasks: int = 64  # the cache-budget curve's working set, in tasks
    http_concurrency: tuple[int, ...] = (1, 4, 16, 32)
    store_samples: int = 100  # loads on a miss timed per store backend
    store_thrash_rounds: int = 10  # passes over the thrash working set
    redis_url: str | None = None  # also measure this Redis store (its keys are written to)
    sections: tuple[str, ...] = SECTIONS
    memory_budget_bytes: int = 4 << 30
    long_prompts: LongPromptSpec = field(default_factory=LongPromptSpec)
    prompt_cache: PromptCacheSpec = field(default_factory=PromptCacheSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    roofline: RooflineSpec = field(default_factory=RooflineSpec)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


QUICK = {  # `--quick`: every section on a tiny model in well under a minute (a smoke run, not numbers)
    "geometry": "tiny",
    "repeats": 1,
    "workload": WorkloadSpec(requests=8, prompt_tokens=(4, 12), new_tokens=(4, 4)),
    "concurrency": 4,
    "tasks": 4,
    "concurrency_curve": (1, 4),
    "tasks_curve": (8, 512),
    "prefix_curve": (0, 32),
    "cache_curve": (0.5, 2.0),
    "cache_tasks": 16,
    "http_concurrency": (1, 4),
    "store_samples": 10,
    "store_thrash_rounds": 2,
    "long_prompts": LongPromptSpec(
        short_requests=3, short_tokens=8, long_tokens=300, new_tokens=4, joining_tokens=600, shared_rows=4
    ),
    "scale": ScaleSpec(tasks=300, batch=100, requests=16, startup_tasks=600, startup_tenants=3),
    "prompt_cache": PromptCacheSpec(rows=4, system_tokens=200, turn_tokens=12, new_tokens=4, chat_turns=3),
    "roofline": RooflineSpec(
        batches=(1, 4), prompt_tokens=16, prefix_tokens=6, warmup_steps=1, steps=4, copy_mib=16
    ),
}
