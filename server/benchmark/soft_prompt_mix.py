"""The baselines' task mix with every other task a soft prompt (the ``engine-soft-prompts`` system).

Each soft prompt becomes the keys and values of its virtual tokens (``soft_prompt_prefix``) as the registry
makes them when it loads the task, outside the timed runs; that one-time cost is timed here, beside the
decode and cast that a deep prefix of the same length costs at load instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial

from prefix_store.cache.loading import place_prefix
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.benchmark.models import random_soft_prompts
from server.engine.base_model import BaseModel
from server.engine.soft_prompts import soft_prompt_prefix

TIMED_LOADS = 5  # times each task's load work is timed; the median counts


def with_soft_prompts(
    base: BaseModel, prefixes: Mapping[str, Prefix], *, seed: int
) -> tuple[dict[str, Prefix], dict[str, float]]:
    """``prefixes`` with every other task of the round-robin order (``sorted``, from the second) replaced by
    a random soft prompt of the same length, served as its keys and values; and what loading costs, the
    median over those tasks in ms: the soft prompt's encode pass (``soft_prompt_encode_ms``) and the
    decode and cast of the deep prefix it replaces (``prefix_decode_cast_ms``)."""
    names = sorted(prefixes)[1::2]
    lengths = [prefixes[name].num_virtual_tokens for name in names]
    # in the model dtype on the CPU, as fetch_prefix hands a decoded soft prompt to the encoder
    soft_prompts = [sp.to("cpu", base.dtype) for sp in random_soft_prompts(base, lengths, seed=seed)]
    soft_prompt_prefix(base, soft_prompts[0])  # warm-up: the model has served before a task loads
    tasks, encode_ms, decode_cast_ms = dict(prefixes), [], []
    for name, soft_prompt in zip(names, soft_prompts, strict=True):
        encode_ms.append(_median_ms(partial(soft_prompt_prefix, base, soft_prompt)))
        tasks[name] = place_prefix(soft_prompt_prefix(base, soft_prompt), base.device)
        deep = prefixes[name]  # uploaded in float32, like a soft prompt
        blob = encode_native(Prefix(deep.keys.float().cpu(), deep.values.float().cpu()), base.geometry)
        decode_cast_ms.append(_median_ms(partial(_decode_and_cast, base, blob)))
    return tasks, {
        "soft_prompt_tasks": len(names),
        "soft_prompt_encode_ms": statistics.median(encode_ms),
        "prefix_decode_cast_ms": statistics.median(decode_cast_ms),
    }


def _decode_and_cast(base: BaseModel, blob: bytes) -> Prefix | SoftPrompt:
    """What ``fetch_prefix`` does to a prefix's bytes once it has read them."""
    return decode_native(blob, base.geometry, PrefixLimits()).to("cpu", base.dtype)


def _median_ms(work: Callable[[], object]) -> float:
    """The median wall time of ``work()`` in ms (both kinds of work end in CPU tensors: no sync needed)."""
    samples = []
    for _ in range(TIMED_LOADS):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3
