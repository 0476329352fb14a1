"""The engine core: one step = schedule → run → update, over a continuously changing batch.

Requests of any tenant and task join the running batch between steps (prefilled as a small batch of
their own, then merged) and leave it the moment they finish. The core is synchronous; its methods
may be called from any thread (a lock guards the scheduler and the waiting requests), while ``step``
runs on the one thread that owns the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefix_store import Prefix
from server.engine.base_model import BaseModel
from server.engine.batch import BatchRow, PrefixBatch
from server.engine.request import GenerationRequest, RequestOutput, check_fits
from server.engine.request_state import RequestStatus
from server.engine.runner import ModelInputs, ModelRunner
from server.engine.running_batch import RunningBatch
from server.engine.sampling import sample_next_tokens
from server.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig
from server.engine.stopping import CompletionTracker, FinishReason, StopCriteria

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """A request's generation state while the engine holds it."""

    request: GenerationRequest
    prefix: Prefix | None
    tracker: CompletionTracker
    generator: torch.Generator | None = None
    reported: int = field(default=0)  # tokens already handed out in outputs


class EngineCore:
    def __init__(
        self,
        base: BaseModel,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        static_batching: bool = False,
    ) -> None:
        """``static_batching`` admits new requests only when the batch is empty (a baseline to compare to)."""
        self.base = base
        self.scheduler = Scheduler(config or SchedulerConfig())
        self.runner = ModelRunner(base)
        self.static_batching = static_batching
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[str, _Sequence] = {}
        self._running: RunningBatch[_Sequence] = RunningBatch(
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
        sequence = _Sequence(
            request, request.prefix, CompletionTracker(self.base.tokenizer, criteria, request.prompt_ids)
        )
        scheduled = ScheduledRequest(
            request_id=request.request_id,
            tenant=request.tenant,
            task_id=request.task_id,
            cost_tokens=prefix_length + len(request.prompt_ids) + request.max_new_tokens,
            deadline=request.deadline,
            status=RequestStatus.WAITING if prefix_ready else RequestStatus.WAITING_FOR_PREFIX,
        )
        with self._lock:
            self.scheduler.add(scheduled)
            self._waiting[request.request_id] = sequence

    def set_prefix(self, request_id: str, prefix: Prefix | None) -> bool:
        """The prefix of a request added with ``prefix_ready=False`` is resident: it may now run.

        Returns False if the request has already ended (aborted or expired while its prefix loaded).
        Raises ``RequestTooLong`` (and forgets the request) if prefix + prompt + new tokens do not fit.
        """
        with self._lock:
            sequence = self._waiting.get(request_id)
            if sequence is None:
                return False
            prefix_length = prefix.num_virtual_tokens if prefix else 0
            try:
                check_fits(self.base, sequence.request, prefix_length)
                self.scheduler.prefix_ready(request_id, extra_cost_tokens=prefix_length)
            except ValueError:
                self._forget(request_id)
                raise
            sequence.prefix = prefix
            return True

    def abort(self, request_id: str) -> None:
        """End a request at the next step (its final output says ``aborted``)."""
        with self._lock:
            self.scheduler.abort(request_id)

    def discard(self, request_id: str) -> None:
        """Forget a request that never started (e.g. its prefix failed to load); no output follows."""
        with self._lock:
            if request_id in self._waiting:
                self._forget(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return len(self._running) > 0 or self.scheduler.num_waiting > 0

    def counts(self) -> dict[str, int]:
        """Requests admitted (prefilling or decoding) and requests waiting (for gauges and tests).

        Admitted requests are counted by the scheduler, not by the running batch: during a step, the
        rows being prefilled are in neither the waiting set nor the batch yet.
        """
        with self._lock:
            return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting}

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
        if admitted:
            rows = [BatchRow(s.request.request_id, s.request.prompt_ids, s.prefix) for s in admitted]
            prefill = PrefixBatch.from_rows(rows, self.base.geometry, self.base.device, self.base.dtype)
            tokens = self._run(prefill, admitted, outputs)
            if tokens is not None:
                prefill.advance(tokens)
                self._running.add(prefill, admitted, tokens)
            else:
                with self._lock:
                    for sequence in admitted:
                        self.scheduler.finish(sequence.request.request_id)
        self._drop_finished()
        return outputs

    def _schedule(self, outputs: list[RequestOutput]) -> list[_Sequence]:
        with self._lock:
            if self.static_batching and len(self._running):
                decision = self.scheduler.schedule(self._clock(), admit=False)
            else:
                decision = self.scheduler.schedule(self._clock())
            for reason, request_ids in (
                (FinishReason.ABORTED, decision.aborted),
                (FinishReason.DEADLINE, decision.expired),
            ):
                for request_id in request_ids:
                    sequence = self._waiting.get(request_id) or next(
                        (s for s in self._running.rows if s.request.request_id == request_id), None
                    )
                    if sequence is not None and sequence.tracker.finish_reason is None:
                        sequence.tracker.finish_reason = reason
                        outputs.append(self._output(sequence))
                    if request_id in self._waiting:
                        self._forget(request_id)
            return [self._waiting.pop(request_id) for request_id in decision.admitted]

    def _run(
        self, batch: ModelInputs, sequences: Sequence[_Sequence], outputs: list[RequestOutput]
    ) -> torch.Tensor | None:
        """One forward pass and sampling; the sampled tokens ``[B]``, or None (rows ended with an error)."""
        try:
            logits = self.runner.forward(batch)  # [B, V]
            tokens = sample_next_tokens(
                logits, [s.request.sampling for s in sequences], [self._generator(s) for s in sequences]
            )
        except Exception:
            log.exception("forward pass failed; ending its %d rows", len(sequences))
            for sequence in sequences:
                sequence.tracker.finish_reason = FinishReason.ERROR
                outputs.append(self._output(sequence))
            return None
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            progress = sequence.tracker.append(token)
            outputs.append(self._output(sequence, progress.delta))
        return tokens

    def _generator(self, sequence: _Sequence) -> torch.Generator | None:
        if sequence.generator is None and not sequence.request.sampling.greedy:
            sequence.generator = sequence.request.sampling.new_generator(self.base.device)
        return sequence.generator

    def _drop_finished(self) -> None:
        ended = [i for i, s in enumerate(self._running.rows) if s.tracker.finish_reason is not None]
        if not ended:
            return
        with self._lock:
            for i in ended:
                self.scheduler.finish(self._running.rows[i].request.request_id)
        self._running.remove(ended)

    def _forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)
        self.scheduler.finish(request_id)

    def _output(self, sequence: _Sequence, text: str = "") -> RequestOutput:
        tracker = sequence.tracker
        new_tokens = tracker.token_ids[sequence.reported :]
        sequence.reported = len(tracker.token_ids)
        if tracker.finish_reason is not None:
            text += tracker.text[tracker.emitted :]  # flush text held back for a stop sequence
            tracker.emitted = len(tracker.text)
        return RequestOutput(
            request_id=sequence.request.request_id,
            token_ids=new_tokens,
            text=text,
            finish_reason=tracker.finish_reason,
            prompt_tokens=len(sequence.request.prompt_ids),
            completion_tokens=len(tracker.token_ids),
        )
