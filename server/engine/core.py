"""The engine core: one step = schedule → one packed pass (decode + prefill), over a continuously changing
batch.

Requests of any tenant and task join between steps and leave the moment they finish. Each request is one
``EngineRequest`` record, held by the scheduler from ``add_request`` until it ends; admitted, it becomes a
row with blocks in the paged KV cache (its prefix's shared, read-only blocks, then its own). A step feeds,
in one packed forward pass, one token for every row past its prompt and the next chunk of some prompts
(``prefill_plan``: at most ``prefill_step_tokens`` per step, so a long prompt never stalls the decoding
rows for its whole prefill); a prompt's last chunk gives the row its first token, and it decodes from the
next step on. Ending a request gives its prefix pin and its blocks back. The core is synchronous; its
methods may be called from any thread (a lock guards the scheduler), while ``step`` runs on the one thread
that owns the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import torch

from prefix_store.cache.pins import PrefixPins
from prefix_store.cache.registry import PrefixHandle
from server.engine.base_model import BaseModel
from server.engine.engine_request import EngineRequest, conditioning
from server.engine.kv_cache import KVCacheStats, PagedKVCache, blocks_for_reservations, reservations_held
from server.engine.kv_pool import KVPool
from server.engine.lifecycle import FinishReason, RequestStatus
from server.engine.logits_processing import RowHistory, process_logits
from server.engine.logprobs import token_logprobs
from server.engine.paged_batch import PagedBatch
from server.engine.prefill_plan import plan_chunks
from server.engine.prompt_cache import PromptCache, PromptCacheStats
from server.engine.request import GenerationRequest, RequestOutput, check_fits, token_cost
from server.engine.runner import ModelRunner
from server.engine.sampling import sample_next_tokens
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.stopping import CompletionTracker, StopCriteria

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """What the engine has done and holds, as the last step left it (for gauges and tests)."""

    steps: int
    prefill_tokens: int  # prompt tokens prefilled over all steps
    kv: KVCacheStats
    prompt_cache: PromptCacheStats


class EngineCore:
    def __init__(
        self,
        base: BaseModel,
        config: SchedulerConfig | None = None,
        *,
        pins: PrefixPins | None = None,
        clock: Callable[[], float] = time.monotonic,
        static_batching: bool = False,
        kv_cache_bytes: int | None = None,
        prompt_cache: bool = True,
    ) -> None:
        """``pins``: the prefix registry that requests for a task are pinned in (``AsyncEngine`` loads
        them); the core gives each pin back when its request ends. ``static_batching`` admits new
        requests only when the batch is empty (a baseline to compare to). ``kv_cache_bytes`` sizes the
        KV pool (default: what ``config.max_batch_tokens`` can reserve); a smaller pool lowers the
        scheduler's token budget to what it holds. Raises ``ValueError`` if it cannot hold a block per row."""
        config = config or SchedulerConfig()
        rows = config.max_batch_size
        extra_blocks = rows * base.kind.extra_blocks_per_row
        if kv_cache_bytes is None:
            num_blocks = blocks_for_reservations(config.max_batch_tokens, rows) + extra_blocks
        else:
            num_blocks = kv_cache_bytes // KVPool.block_bytes(base.geometry, base.dtype)
            held = reservations_held(num_blocks - extra_blocks, rows)
            if held <= 0:
                raise ValueError(
                    f"a KV pool of {kv_cache_bytes} bytes holds {num_blocks} blocks; {rows} rows need more "
                    f"than {blocks_for_reservations(0, rows)} (raise kv_cache_bytes or lower max_batch_size)"
                )
            config = replace(config, max_batch_tokens=min(config.max_batch_tokens, held))
        self.base = base
        self.pins = pins
        self.scheduler: Scheduler[EngineRequest] = Scheduler(config)
        self.runner = ModelRunner(base)
        self.static_batching = static_batching
        self._clock = clock
        self._lock = threading.Lock()
        self.kv = PagedKVCache(
            base.geometry,
            num_blocks=num_blocks,
            device=base.device,
            dtype=base.dtype,
            prompt_cache=prompt_cache,
        )
        self.prompt_cache = PromptCache(base, enabled=prompt_cache)
        # grammar masks are computed ahead on these threads (llguidance drops the GIL): a row whose mask is
        # not ready sits out a step, so a costly grammar holds only its own row
        self._grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")
        head = base.model.get_output_embeddings()
        self._vocab_size = (
            base.model.config.vocab_size if head is None else head.weight.shape[0]
        )  # logits' width
        self._waiting_for_blocks: list[
            EngineRequest
        ] = []  # admitted, waiting for another row's prompt blocks
        self._prefilling: list[EngineRequest] = []  # admitted rows with prompt left, oldest first
        self._decoding: list[EngineRequest] = []  # rows past their prompt
        self.prefill_tokens_last_step = 0
        self._stats = EngineStats(0, 0, self.kv.stats(), self.prompt_cache.stats())  # read by other threads

    # -- called from any thread ---------------------------------------------------------------
    def add_request(self, request: GenerationRequest, *, prefix_ready: bool = True) -> None:
        """Queue ``request``. With ``prefix_ready=False`` it waits until ``set_prefix``, which checks it
        (``check_fits``) once its prefix's length is known; else it is checked here.

        Raises ``QueueFull`` (the queue is at its bound), ``RequestTooLong``, ``ValueError``.
        """
        prefix_length = request.prefix.num_virtual_tokens if request.prefix else 0
        if prefix_ready:
            check_fits(self.base, request, prefix_length)
        criteria = StopCriteria(
            max_new_tokens=request.max_new_tokens,
            stop_sequences=request.stop_sequences,
            eos_token_ids=frozenset() if request.ignore_eos else self.base.eos_token_ids,
            stop_token_ids=frozenset(request.stop_token_ids),
            min_tokens=request.min_tokens,
        )
        decoder_prompt = self.base.kind.decoder_prompt(request.prompt_ids)
        record = EngineRequest(
            request,
            decoder_prompt,
            CompletionTracker(self.base.tokenizer, criteria, decoder_prompt),
            cost_tokens=token_cost(request, prefix_length),
            status=RequestStatus.WAITING if prefix_ready else RequestStatus.WAITING_FOR_PREFIX,
        )
        if request.prefix is not None and prefix_ready:
            record.shared_key = f"{request.tenant}|{record.conditioning}"
            record.shared_tokens = prefix_length
        with self._lock:
            self.scheduler.add(record)

    def set_prefix(self, request_id: str, pin: PrefixHandle) -> bool:
        """The prefix of a request added with ``prefix_ready=False`` is pinned: it may now run.

        Returns True once the request holds ``pin`` (the core releases it when the request ends);
        False if the request has already ended (aborted or expired while its prefix loaded). Raises
        ``RequestTooLong`` (and forgets the request) if prefix + prompt + new tokens do not fit. On False
        or an exception the pin stays the caller's.
        """
        with self._lock:
            record = self.scheduler.get(request_id)
            if record is None:
                return False
            prefix_length = pin.num_virtual_tokens
            try:
                check_fits(self.base, record.request, prefix_length)
                shared_key = f"{record.tenant}|{conditioning(pin, None)}"
                self.scheduler.prefix_ready(request_id, prefix_length, shared_key)
            except ValueError:
                self.scheduler.finish(request_id)
                raise
            record.pin = pin
            return True

    def shared_pin(self, request_id: str) -> PrefixHandle | None:
        """Another pin of the prefix version request ``request_id`` holds; None if it holds none (any more)."""
        with self._lock:
            record = self.scheduler.get(request_id)
            if record is None or record.pin is None or self.pins is None:
                return None
            return self.pins.share(record.pin)

    def abort(self, request_id: str) -> None:
        """End a request at the next step (its final output says ``aborted``)."""
        with self._lock:
            self.scheduler.abort(request_id)

    def discard(self, request_id: str) -> None:
        """Forget a request that never started (e.g. its prefix failed to load); no output follows."""
        with self._lock:
            record = self.scheduler.get(request_id)
            if record is not None and record.status is not RequestStatus.RUNNING:
                self._finish(record)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.num_running > 0 or self.scheduler.num_waiting > 0

    def counts(self) -> dict[str, int]:
        """Requests admitted (prefilling or decoding) and requests waiting (for gauges and tests)."""
        with self._lock:
            return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting}

    @property
    def token_budget(self) -> int:
        """The most tokens (prefix + prompt + max_new_tokens) one request may reserve: the batch's budget."""
        return self.scheduler.config.max_batch_tokens

    @property
    def num_pinned(self) -> int:
        """Requests holding a prefix pin (for tests and gauges)."""
        with self._lock:
            return sum(record.pin is not None for record in self.scheduler)

    def stats(self) -> EngineStats:
        """Steps, prefilled tokens and the KV pool, as the last step left them."""
        return self._stats

    @property
    def rows(self) -> list[EngineRequest]:
        """The admitted rows, decoding ones first (read on the engine thread, or between steps)."""
        return self._decoding + self._prefilling + self._waiting_for_blocks

    # -- the engine thread --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (possibly none)."""
        outputs: list[RequestOutput] = []
        self.prompt_cache.run_tasks(self.kv)
        waiting, self._waiting_for_blocks = self._waiting_for_blocks, []
        for record in [*waiting, *self._schedule(outputs)]:
            self._open_row(record, outputs)
        self._drop_finished()  # aborted and expired rows leave before the forward pass
        if not self._forward(outputs):
            self._wait_for_a_mask()
        self._drop_finished()
        self._stats = EngineStats(
            self._stats.steps + 1,
            self._stats.prefill_tokens + self.prefill_tokens_last_step,
            self.kv.stats(),
            self.prompt_cache.stats(),
        )
        return outputs

    def _open_row(self, record: EngineRequest, outputs: list[RequestOutput]) -> None:
        """Give an admitted request its row in the KV pool (an encoder-decoder's: its source encoded first),
        with what the prompt cache holds of its prompt; if that fails, the request alone ends with an error.
        A request whose prompt's next blocks another row is computing waits a step (and finds them)."""
        if record.tracker.finish_reason is not None:  # ended (aborted, expired) while it waited
            with self._lock:
                self._finish(record)
            return
        try:
            row = self.prompt_cache.open(self.kv, record, self.base.kind.source(record.request.prompt_ids))
        except Exception:
            log.exception("request %s: its row could not be opened; it ends with an error", record.request_id)
            outputs.append(self._output(record, record.tracker.end(FinishReason.ERROR)))
            with self._lock:
                self._finish(record)
            return
        if row is None:
            self._waiting_for_blocks.append(record)
            return
        record.kv = row
        if record.request.grammar is not None:
            record.matcher = record.request.grammar.matcher()
            record.matcher.prefetch(self._grammar_pool, self._vocab_size, self.base.device)
        self._prefilling.append(record)

    def _forward(self, outputs: list[RequestOutput]) -> bool:
        """One packed pass: every decoding row's next token and this step's prompt chunks (``plan_chunks``),
        so the model's weights are read once for both (a row that asked for its prompt's logprobs is
        prefilled in a pass of its own, which keeps the logits of every position). Rows whose prompt is
        done move on to decoding, or end there if they asked for no new tokens. A decoding row whose grammar
        mask is still being computed sits this step out (and a prompt's last chunk waits for it). Returns
        whether any pass ran."""
        config = self.scheduler.config
        decoding = [r for r in self._decoding if r.matcher is None or r.matcher.ready]
        prefilling = [  # a prompt's last chunk samples the first token: it waits for the row's mask
            r
            for r in self._prefilling
            if r.matcher is None or r.matcher.ready or r.prompt_left > config.prefill_chunk_tokens
        ]
        chunks = plan_chunks(
            prefilling,
            lambda record: record.prompt_left,
            chunk_tokens=config.prefill_chunk_tokens,
            step_tokens=config.prefill_step_tokens,
        )
        plain = [chunk for chunk in chunks if chunk.row.request.prompt_logprobs is None]
        passes = [(decoding, plain, False)] if decoding or plain else []
        passes += [([], [chunk], True) for chunk in chunks if chunk.row.request.prompt_logprobs is not None]
        for decoding, group, every_position in passes:
            records = [*decoding, *(chunk.row for chunk in group)]
            inputs = [[r.next_token] for r in decoding] + [
                chunk.row.decoder_prompt[chunk.row.num_computed_tokens :][: chunk.tokens] for chunk in group
            ]
            batch = self.kv.batch([r.kv for r in records], inputs)
            done = [len(decoding) + i for i, chunk in enumerate(group) if chunk.last]
            sampled = [*range(len(decoding)), *(i for i in done if records[i].request.max_new_tokens > 0)]
            self._run(batch, records, outputs, sampled=sampled, every_position=every_position)
            for i in done:
                if records[i].request.max_new_tokens == 0 and records[i].tracker.finish_reason is None:
                    outputs.append(self._output(records[i], records[i].tracker.end(FinishReason.LENGTH)))
        self.prefill_tokens_last_step = sum(chunk.tokens for chunk in chunks)
        self._decoding = self._decoding + [r for r in self._prefilling if r.prompt_left == 0]
        self._prefilling = [r for r in self._prefilling if r.prompt_left > 0]
        return bool(passes)

    def _wait_for_a_mask(self, timeout_s: float = 0.05) -> None:
        """Nothing could run this step: wait (briefly) for a decoding row's grammar mask, not spin."""
        pending = [r.matcher.pending for r in self.rows if r.matcher is not None and r.matcher.pending]
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def _schedule(self, outputs: list[RequestOutput]) -> list[EngineRequest]:
        with self._lock:
            decision = self.scheduler.schedule(
                self._clock(), admit=not (self.static_batching and self.scheduler.num_running)
            )
            for reason, request_ids in (
                (FinishReason.ABORTED, decision.aborted),
                (FinishReason.DEADLINE, decision.expired),
            ):
                for request_id in request_ids:
                    record = self.scheduler.get(request_id)
                    if record is None or record.tracker.finish_reason is not None:
                        continue
                    outputs.append(self._output(record, record.tracker.end(reason)))
                    if record.status is not RequestStatus.RUNNING:
                        self._finish(record)  # a running row leaves at _drop_finished
            return [record for rid in decision.admitted if (record := self.scheduler.get(rid)) is not None]

    def _run(
        self,
        batch: PagedBatch,
        records: Sequence[EngineRequest],
        outputs: list[RequestOutput],
        sampled: Sequence[int],
        *,
        every_position: bool = False,
    ) -> None:
        """One forward pass over ``records``; the rows at ``sampled`` get their next token. With
        ``every_position`` (one row) the prompt tokens it fed get their logprobs. A row whose logits are
        not finite ends with an error (``_end_nonfinite_rows``); if the pass fails, every row of it does."""
        try:
            logits = self.runner.forward(batch, every_position=every_position)  # [B, V] or [B, Q, V]
            batch.advance()
            self.kv.name_full_blocks(batch.rows)
            broken = self._end_nonfinite_rows(records, logits, outputs)
            if every_position:
                if not broken:
                    self._add_prompt_logprobs(records[0], logits[0, -batch.fed[0] :])
                logits = logits[:, -1]
            rows = [i for i in sampled if i not in broken]
            histories = {i: self._history(records[i]) for i in rows}
            broken |= self._end_stuck_grammars(records, histories, outputs)
            rows = [i for i in rows if i not in broken]
            chosen = [records[i] for i in rows]
            last = logits if len(chosen) == len(records) else logits[rows]  # [b, V], raw
            params = [r.request.sampling for r in chosen]
            tokens = (
                sample_next_tokens(
                    process_logits(last, params, [histories[i] for i in rows]),
                    params,
                    [self._generator(r) for r in chosen],
                )
                if chosen
                else last.new_empty(0, dtype=torch.long)
            )
            self._add_logprobs(chosen, last, tokens)
        except Exception:
            log.exception("forward pass failed; ending its %d rows", len(records))
            for record in records:
                if record.tracker.finish_reason is None:  # not already ended for non-finite logits
                    outputs.append(self._output(record, record.tracker.end(FinishReason.ERROR)))
            return
        for record, token in zip(chosen, tokens.tolist(), strict=True):
            record.next_token = token
            progress = record.tracker.append(token)
            text = progress.delta
            if record.matcher is not None and progress.finish_reason is None:
                record.matcher.accept(token)
                if record.matcher.failed is not None:
                    log.warning(
                        "request %s: its grammar failed: %s", record.request_id, record.matcher.failed
                    )
                    text += record.tracker.end(FinishReason.GRAMMAR)
                elif record.matcher.done:
                    text += record.tracker.end(FinishReason.STOP)  # the document is complete
                else:
                    record.matcher.prefetch(self._grammar_pool, self._vocab_size, self.base.device)
            outputs.append(self._output(record, text))

    def _end_stuck_grammars(
        self,
        records: Sequence[EngineRequest],
        histories: dict[int, RowHistory],
        outputs: list[RequestOutput],
    ) -> set[int]:
        """End (``GRAMMAR``) each row whose grammar failed while computing its mask, or allows no token:
        sampling it would pick a token its grammar forbids. Returns the indices of the rows ended."""
        stuck = set()
        for i, history in histories.items():
            matcher = records[i].matcher
            if matcher is not None and (matcher.failed is not None or not bool(history.allowed.any())):
                log.warning("request %s: its grammar cannot go on: %s", records[i].request_id, matcher.failed)
                outputs.append(self._output(records[i], records[i].tracker.end(FinishReason.GRAMMAR)))
                stuck.add(i)
        return stuck

    def _end_nonfinite_rows(
        self, records: Sequence[EngineRequest], logits: torch.Tensor, outputs: list[RequestOutput]
    ) -> set[int]:
        """End with an error each row whose logits (``[B, V]``, or ``[B, Q, V]`` at every position) hold a
        NaN or an infinity, e.g. from a prefix whose values overflow in attention: sampling from them would
        give garbage tokens. One vectorised check for the whole pass; returns the indices of the rows ended."""
        finite = torch.isfinite(logits).flatten(1).all(dim=1).tolist()  # [B]
        broken = {i for i, ok in enumerate(finite) if not ok}
        for i in sorted(broken):
            log.warning("request %s: its logits are not finite; it ends with an error", records[i].request_id)
            outputs.append(self._output(records[i], records[i].tracker.end(FinishReason.ERROR)))
        return broken

    def _history(self, record: EngineRequest) -> RowHistory:
        """What logits processing needs of a row about to pick a token (its grammar's mask, computed ahead
        where it could be)."""
        generated = record.tracker.token_ids
        allowed = None
        if record.matcher is not None:
            allowed = record.matcher.allowed(self._vocab_size, self.base.device)
        return RowHistory(
            record.decoder_prompt, generated, record.tracker.criteria.banned_ids(len(generated)), allowed
        )

    @staticmethod
    def _add_logprobs(records: Sequence[EngineRequest], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """The sampled ``tokens`` ``[b]``' logprobs under ``logits`` ``[b, V]``, for the rows that asked."""
        asked = [i for i, r in enumerate(records) if r.request.logprobs is not None]
        if not asked:
            return
        rows = torch.tensor(asked, device=logits.device)
        top = [records[i].request.logprobs or 0 for i in asked]
        for i, logprob in zip(asked, token_logprobs(logits[rows], tokens[rows], top), strict=True):
            records[i].logprobs.append(logprob)

    @staticmethod
    def _add_prompt_logprobs(record: EngineRequest, logits: torch.Tensor) -> None:
        """The logprobs of the prompt tokens that ``logits`` ``[c, V]`` (at the c tokens just fed) predict:
        position j of the chunk gives the next prompt token's."""
        prompt, fed = record.decoder_prompt, logits.shape[0]
        start = record.num_computed_tokens - fed  # the chunk's first prompt index (the pass has advanced)
        if record.prompt_logprobs is None:
            record.prompt_logprobs = [None]  # the first token has no context to be predicted from
        following = list(prompt[start + 1 : start + fed + 1])  # the tokens positions start… predict
        if following:
            ids = torch.tensor(following, device=logits.device)
            top = [record.request.prompt_logprobs or 0] * len(following)
            record.prompt_logprobs += token_logprobs(logits[: len(following)], ids, top)

    def _generator(self, record: EngineRequest) -> torch.Generator | None:
        if record.generator is None and not record.request.sampling.greedy:
            record.generator = record.request.sampling.new_generator(self.base.device)
        return record.generator

    def _drop_finished(self) -> None:
        ended = [r for r in self.rows if r.tracker.finish_reason is not None]
        if not ended:
            return
        with self._lock:
            for record in ended:
                self._finish(record)
        self._decoding = [r for r in self._decoding if r.tracker.finish_reason is None]
        self._prefilling = [r for r in self._prefilling if r.tracker.finish_reason is None]
        self._waiting_for_blocks = [r for r in self._waiting_for_blocks if r.tracker.finish_reason is None]

    def _finish(self, record: EngineRequest) -> None:
        """The request has left the engine: forget it, give its pin and its KV blocks back (under the lock)."""
        self.scheduler.finish(record.request_id)
        if record.kv is not None:
            self.kv.close(record.kv)
            record.kv = None
        if record.pin is not None:
            pin, record.pin = record.pin, None
            if self.pins is not None:
                self.pins.release(pin)

    def _output(self, record: EngineRequest, text: str = "") -> RequestOutput:
        tracker = record.tracker
        reported, record.reported = record.reported, len(tracker.token_ids)
        prompt_logprobs = None
        if record.prompt_logprobs is not None and record.prompt_left == 0 and not record.prompt_logprobs_sent:
            prompt_logprobs, record.prompt_logprobs_sent = record.prompt_logprobs, True
        return RequestOutput(
            request_id=record.request_id,
            token_ids=tracker.token_ids[reported:],
            text=text,
            finish_reason=tracker.finish_reason,
            prompt_tokens=len(record.request.prompt_ids),
            completion_tokens=len(tracker.token_ids),
            logprobs=record.logprobs[reported:] if record.request.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
            cached_tokens=record.cached_tokens,
        )
