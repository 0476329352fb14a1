"""The engine core: one step = schedule → run → update, over a continuously changing batch.

Requests of any tenant and task join the running batch between steps (prefilled as a small batch of
their own, then merged) and leave it the moment they finish. Each request is one ``EngineRequest``
record, held by the scheduler from ``add_request`` until it ends (and by the running batch as a row
meanwhile); ending it gives its prefix pin back. The core is synchronous; its methods may be called from
any thread (a lock guards the scheduler), while ``step`` runs on the one thread that owns the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from prefix_store.cache.pins import PrefixPins
from prefix_store.cache.registry import PrefixHandle
from server.engine.base_model import BaseModel
from server.engine.engine_request import EngineRequest
from server.engine.lifecycle import FinishReason, RequestStatus
from server.engine.prefill_batch import BatchRow, PrefillBatch
from server.engine.prefill_groups import length_groups
from server.engine.request import GenerationRequest, RequestOutput, check_fits, token_cost
from server.engine.runner import ModelInputs, ModelRunner
from server.engine.running_batch import RunningBatch
from server.engine.sampling import sample_next_tokens
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.stopping import CompletionTracker, StopCriteria

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        base: BaseModel,
        config: SchedulerConfig | None = None,
        *,
        pins: PrefixPins | None = None,
        clock: Callable[[], float] = time.monotonic,
        static_batching: bool = False,
    ) -> None:
        """``pins``: the prefix registry that requests for a task are pinned in (``AsyncEngine`` loads
        them); the core gives each pin back when its request ends. ``static_batching`` admits new
        requests only when the batch is empty (a baseline to compare to)."""
        self.base = base
        self.pins = pins
        self.scheduler: Scheduler[EngineRequest] = Scheduler(config or SchedulerConfig())
        self.runner = ModelRunner(base)
        self.static_batching = static_batching
        self._clock = clock
        self._lock = threading.Lock()
        self._running: RunningBatch[EngineRequest] = RunningBatch(
            base.geometry, self.scheduler.config.max_batch_size, base.device, base.dtype
        )

    # -- called from any thread ---------------------------------------------------------------
    def add_request(self, request: GenerationRequest, *, prefix_ready: bool = True) -> None:
        """Queue ``request``. With ``prefix_ready=False`` it waits until ``set_prefix``.

        Raises ``QueueFull`` (the queue is at its bound), ``RequestTooLong``, ``ValueError``.
        """
        prefix_length = request.prefix.num_virtual_tokens if request.prefix else 0
        check_fits(self.base, request, prefix_length)
        criteria = StopCriteria(
            max_new_tokens=request.max_new_tokens,
            stop_sequences=request.stop_sequences,
            eos_token_ids=frozenset() if request.ignore_eos else self.base.eos_token_ids,
        )
        record = EngineRequest(
            request,
            CompletionTracker(self.base.tokenizer, criteria, request.prompt_ids),
            cost_tokens=token_cost(request, prefix_length),
            status=RequestStatus.WAITING if prefix_ready else RequestStatus.WAITING_FOR_PREFIX,
        )
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
            prefix_length = pin.prefix.num_virtual_tokens
            try:
                check_fits(self.base, record.request, prefix_length)
                self.scheduler.prefix_ready(request_id, extra_cost_tokens=prefix_length)
            except ValueError:
                self.scheduler.finish(request_id)
                raise
            record.pin = pin
            return True

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
            return len(self._running) > 0 or self.scheduler.num_waiting > 0

    def counts(self) -> dict[str, int]:
        """Requests admitted (prefilling or decoding) and requests waiting (for gauges and tests).

        Admitted requests are counted by the scheduler, not by the running batch: during a step, the
        rows being prefilled are in neither the waiting queues nor the batch yet.
        """
        with self._lock:
            return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting}

    @property
    def num_pinned(self) -> int:
        """Requests holding a prefix pin (for tests and gauges)."""
        with self._lock:
            return sum(record.pin is not None for record in self.scheduler)

    # -- the engine thread --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (possibly none)."""
        outputs: list[RequestOutput] = []
        admitted = self._schedule(outputs)
        self._drop_finished()  # aborted and expired rows leave before the forward pass
        if len(self._running):
            self._running.prepare_step()
            tokens = self._run(self._running, self._running.rows, outputs)
            if tokens is not None:
                self._running.advance(tokens)
        for group in length_groups(admitted, lambda record: len(record.request.prompt_ids)):
            self._prefill(group, outputs)
        self._drop_finished()
        return outputs

    def _prefill(self, records: list[EngineRequest], outputs: list[RequestOutput]) -> None:
        """Prefill ``records`` together and merge them into the running batch."""
        rows = [BatchRow(r.request_id, r.request.prompt_ids, r.prefix) for r in records]
        prefill = PrefillBatch.from_rows(rows, self.base.geometry, self.base.device, self.base.dtype)
        tokens = self._run(prefill, records, outputs)
        if tokens is not None:
            prefill.advance(tokens)
            self._running.add(prefill, records, tokens)
        else:
            with self._lock:
                for record in records:
                    self._finish(record)

    def _schedule(self, outputs: list[RequestOutput]) -> list[EngineRequest]:
        with self._lock:
            decision = self.scheduler.schedule(
                self._clock(), admit=not (self.static_batching and len(self._running))
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
        self, batch: ModelInputs, records: Sequence[EngineRequest], outputs: list[RequestOutput]
    ) -> torch.Tensor | None:
        """One forward pass and sampling; the sampled tokens ``[B]``, or None (rows ended with an error)."""
        try:
            logits = self.runner.forward(batch)  # [B, V]
            tokens = sample_next_tokens(
                logits, [r.request.sampling for r in records], [self._generator(r) for r in records]
            )
        except Exception:
            log.exception("forward pass failed; ending its %d rows", len(records))
            for record in records:
                outputs.append(self._output(record, record.tracker.end(FinishReason.ERROR)))
            return None
        for record, token in zip(records, tokens.tolist(), strict=True):
            progress = record.tracker.append(token)
            outputs.append(self._output(record, progress.delta))
        return tokens

    def _generator(self, record: EngineRequest) -> torch.Generator | None:
        if record.generator is None and not record.request.sampling.greedy:
            record.generator = record.request.sampling.new_generator(self.base.device)
        return record.generator

    def _drop_finished(self) -> None:
        ended = [i for i, r in enumerate(self._running.rows) if r.tracker.finish_reason is not None]
        if not ended:
            return
        with self._lock:
            for i in ended:
                self._finish(self._running.rows[i])
        self._running.remove(ended)

    def _finish(self, record: EngineRequest) -> None:
        """The request has left the engine: forget it and give its pin back (under the lock)."""
        self.scheduler.finish(record.request_id)
        if record.pin is not None:
            pin, record.pin = record.pin, None
            if self.pins is not None:
                self.pins.release(pin)

    def _output(self, record: EngineRequest, text: str = "") -> RequestOutput:
        tracker = record.tracker
        new_tokens = tracker.token_ids[record.reported :]
        record.reported = len(tracker.token_ids)
        return RequestOutput(
            request_id=record.request_id,
            token_ids=new_tokens,
            text=text,
            finish_reason=tracker.finish_reason,
            prompt_tokens=len(record.request.prompt_ids),
            completion_tokens=len(tracker.token_ids),
        )
