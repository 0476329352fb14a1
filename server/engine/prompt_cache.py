"""The engine's side of automatic prompt caching: what names a row's blocks, the rows' hits, and the
tenants' resets (the blocks themselves are the block manager's: ``block_manager``).

A row's names start from a root of what conditions every number of its keys and values: the base model
(its name, geometry and dtype), the tenant (a server-side salt: tenants never share), the conditioning's
content — a task's stored version by its sha256 and kind (never its name: a hot swap keeps the name and
changes the content; a LoRA task's too, as it changes every layer's keys and values), an in-process prefix
or LoRA task by its digest, or "base" — and the request's ``cache_salt``.
A task's prefix blocks are named from the same root without the salt. Encoder-decoder rows are not
cached: their decoder's prompt is its start token, and their source's blocks are the row's own. Rows
that ask for their prompt's logprobs compute every prompt position (the logprobs come from the pass
that computes them), so they find nothing, though the blocks they fill are named for others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from server.engine.base_model import BaseModel
from server.engine.block_manager import RowChain, root_name
from server.engine.engine_request import EngineRequest
from server.engine.kv_cache import PagedKVCache
from server.engine.paged_batch import RowKV

T = TypeVar("T")


@dataclass(frozen=True)
class PromptCacheStats:
    queried_tokens: int  # prompt tokens of rows that looked their blocks up, since start
    hit_tokens: int  # of those, found cached


class PromptCache:
    """Names rows' blocks by what conditions them, opens rows with what the cache holds of their prompt,
    counts it, and carries the admin's requests (asked from any thread) to the engine's thread."""

    def __init__(self, base: BaseModel, *, enabled: bool) -> None:
        self.enabled = enabled
        self._model = f"{base.model_id}|{base.geometry.fingerprint}|{base.dtype}"
        self._encoder_decoder = base.encoder_decoder is not None
        self.queried_tokens = self.hit_tokens = 0
        self._tasks: list[tuple[Callable[[PagedKVCache], Any], Future[Any]]] = []
        self._lock = threading.Lock()

    def open(
        self, kv: PagedKVCache, record: EngineRequest, source: tuple[torch.Tensor, torch.Tensor] | None
    ) -> RowKV | None:
        """The record's row, its prompt's cached blocks already its own (counted in its ``length``);
        None while another row is computing the first of its prompt's blocks that is not cached yet (ask
        again at the next step: it will be found)."""
        request = record.request
        conditioning = record.conditioning
        prefix_name = (
            root_name(self._model, request.tenant, conditioning) if record.prefix is not None else None
        )
        chain, prompt = None, record.decoder_prompt
        if self.enabled and not self._encoder_decoder:
            root = root_name(self._model, request.tenant, conditioning, f"salt:{request.cache_salt or ''}")
            chain = RowChain(root, request.tenant, [], [])
            if request.prompt_logprobs is not None:
                prompt = ()  # every prompt position is computed: it finds nothing
            elif kv.computed_by_another(chain, prompt):
                return None
        row = kv.open(
            record.prefix, source, prefix_name=prefix_name, tenant=request.tenant, chain=chain, prompt=prompt
        )
        row.lora = record.lora
        record.cached_tokens = row.length
        if chain is not None:
            self.queried_tokens += len(record.decoder_prompt)
            self.hit_tokens += row.length
        return row

    def on_engine_thread(self, task: Callable[[PagedKVCache], T]) -> Future[T]:
        """Run ``task`` on the engine's thread before its next pass (the block manager is that thread's):
        the admin's reset and view of a tenant's cached blocks, asked from any thread."""
        done: Future[T] = Future()
        with self._lock:
            self._tasks.append((task, done))
        return done

    def run_tasks(self, kv: PagedKVCache) -> None:
        """On the engine's thread, between passes: run the tasks asked for."""
        with self._lock:
            tasks, self._tasks = self._tasks, []
        for task, done in tasks:
            try:
                done.set_result(task(kv))
            except Exception as exc:  # the asker hears of it
                done.set_exception(exc)

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(self.queried_tokens, self.hit_tokens)
