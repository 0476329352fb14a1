"""The scheduler: decides which waiting requests join the running batch. Pure Python, no torch.

Waiting requests are queued per tenant and, inside a tenant, per task. Admission is deficit
round-robin over tenants, charged in tokens (prefix + prompt + max_new_tokens: what a row may
occupy), so a tenant flooding the queue, or sending huge requests, cannot starve another; inside a
tenant, tasks take turns. Only requests whose prefix is resident are admitted; the others wait in
``WAITING_FOR_PREFIX``. The running batch never exceeds ``max_batch_size`` rows or
``max_batch_tokens`` reserved tokens.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from prefix_store.storage.excerpt import excerpt_int
from server.engine.lifecycle import RequestStatus


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, max_waiting: int, retry_after: float) -> None:
        super().__init__(f"the server is at capacity ({max_waiting} requests waiting); retry later")
        self.retry_after = retry_after


class RequestTooLarge(ValueError):
    """A request that could never fit the batch's token budget (``budget``), even alone."""

    def __init__(self, cost_tokens: int, budget: int) -> None:
        super().__init__(
            f"the request needs {excerpt_int(cost_tokens)} tokens (prefix + prompt + max_new_tokens), over the "
            f"batch budget of {budget}"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # rows in the running batch
    max_batch_tokens: int = 32_768  # reserved tokens (prefix + prompt + max_new_tokens) over running rows
    max_waiting: int = 256  # requests waiting (for their prefix or for a slot); more are refused
    quantum_tokens: int = 1024  # deficit round-robin: tokens a tenant may admit per turn
    prefill_chunk_tokens: int = 256  # a prompt is prefilled this many tokens per step (chunked prefill)
    prefill_step_tokens: int = 512  # prompt tokens one step may prefill over all rows (one chunk at least)


class Schedulable(Protocol):
    """What the scheduler reads and sets of a request (the engine's ``EngineRequest``)."""

    cost_tokens: int  # prefix + prompt + max_new_tokens: the most this row can occupy
    status: RequestStatus
    shared_key: str | None  # rows with one key hold ``shared_tokens`` of their cost once (a prefix's blocks)
    shared_tokens: int

    @property
    def request_id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def task_id(self) -> str | None: ...

    @property
    def deadline(self) -> float | None: ...  # monotonic seconds; None = no deadline


R = TypeVar("R", bound=Schedulable)


@dataclass(frozen=True)
class SchedulerOutput:
    """The scheduler's decision for one engine step, by request id: the core acts on it (prefills the
    admitted, ends the others) and builds the runner's inputs."""

    admitted: list[str]  # waiting requests to prefill and merge into the running batch, in order
    expired: list[str]  # requests (waiting or running) whose deadline has passed: end them
    aborted: list[str]  # requests (waiting or running) the client gave up on: end them


@dataclass
class _TenantQueue(Generic[R]):
    tasks: OrderedDict[str | None, deque[R]] = field(default_factory=OrderedDict)
    deficit: int = 0

    def next_ready(self, excluded: AbstractSet[str]) -> R | None:
        """The oldest ready request of the first task (in turn order) that has one."""
        for queue in self.tasks.values():
            for request in queue:
                if request.status is RequestStatus.WAITING and request.request_id not in excluded:
                    return request
        return None

    def remove(self, request: R) -> None:
        queue = self.tasks[request.task_id]
        queue.remove(request)
        if not queue:
            del self.tasks[request.task_id]

    def rotate_task(self, task_id: str | None) -> None:
        """After a task was served, it goes to the back of its tenant's turn order."""
        if task_id in self.tasks:
            self.tasks.move_to_end(task_id)


class Scheduler(Generic[R]):
    """Keeps the waiting queues and the running set's reservations; decides admissions. It holds the
    requests themselves, waiting and running, until ``finish``: ``get`` finds one by id."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._tenants: OrderedDict[str, _TenantQueue[R]] = OrderedDict()  # turn order of tenants
        self._requests: dict[str, R] = {}
        self._running_tokens = 0  # reserved by the running rows, what they share counted once
        self._running = 0
        self._sharing: dict[str, int] = {}  # running rows per shared key
        self._aborts: list[str] = []
        self._turn: str | None = None  # the tenant whose deficit round-robin turn is in progress

    # -- bookkeeping -------------------------------------------------------------------------
    def add(self, request: R) -> None:
        """Queue a new request (status ``WAITING_FOR_PREFIX`` or ``WAITING``). Raises ``QueueFull``."""
        if self.num_waiting >= self.config.max_waiting:
            raise QueueFull(self.config.max_waiting, retry_after=1.0)
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id}")
        self._check_cost(request.cost_tokens)
        self._requests[request.request_id] = request
        tenant = self._tenants.setdefault(request.tenant, _TenantQueue())
        tenant.tasks.setdefault(request.task_id, deque()).append(request)

    def prefix_ready(self, request_id: str, prefix_tokens: int = 0, shared_key: str | None = None) -> None:
        """The request's prefix is resident and pinned (``prefix_tokens`` long; running rows with the same
        ``shared_key`` hold its blocks once): it may be admitted."""
        request = self._requests.get(request_id)
        if request is not None and request.status is RequestStatus.WAITING_FOR_PREFIX:
            self._check_cost(request.cost_tokens + prefix_tokens)
            request.cost_tokens += prefix_tokens
            request.shared_key, request.shared_tokens = shared_key, prefix_tokens
            request.status = RequestStatus.WAITING

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; the next ``schedule`` reports it (once) so the engine ends it."""
        if request_id in self._requests and request_id not in self._aborts:
            self._aborts.append(request_id)

    def finish(self, request_id: str) -> None:
        """Forget a request however it ended, releasing its reservation or its place in the queue."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request.status is RequestStatus.RUNNING:
            self._running -= 1
            self._running_tokens -= request.cost_tokens - request.shared_tokens
            if request.shared_key is not None:
                self._sharing[request.shared_key] -= 1
                if not self._sharing[request.shared_key]:
                    del self._sharing[request.shared_key]
                    self._running_tokens -= request.shared_tokens
        else:
            tenant = self._tenants[request.tenant]
            tenant.remove(request)
            if not tenant.tasks:
                del self._tenants[request.tenant]
                if self._turn == request.tenant:
                    self._turn = None
        request.status = RequestStatus.FINISHED

    def _check_cost(self, cost_tokens: int) -> None:
        if cost_tokens > self.config.max_batch_tokens:
            raise RequestTooLarge(cost_tokens, self.config.max_batch_tokens)

    @property
    def num_waiting(self) -> int:
        return len(self._requests) - self._running

    @property
    def num_running(self) -> int:
        return self._running

    def get(self, request_id: str) -> R | None:
        """The request of that id, waiting or running; None once finished (or never added)."""
        return self._requests.get(request_id)

    def __iter__(self) -> Iterator[R]:
        """Every request not finished, waiting or running."""
        return iter(list(self._requests.values()))

    # -- the decision -----------------------------------------------------------------------
    def schedule(self, now: float, *, admit: bool = True) -> SchedulerOutput:
        """Decide this step: requests to end (aborted, past deadline) and, if ``admit``, requests to admit."""
        aborted, self._aborts = [rid for rid in self._aborts if rid in self._requests], []
        gone = set(aborted)
        expired = [
            r.request_id
            for r in self._requests.values()
            if r.deadline is not None and r.deadline <= now and r.request_id not in gone
        ]
        gone.update(expired)
        admitted = self._admit(gone) if admit else []
        return SchedulerOutput(admitted=admitted, expired=expired, aborted=aborted)

    def _admit(self, excluded: set[str]) -> list[str]:
        """Deficit round-robin over tenants. A turn interrupted by a full batch resumes next step."""
        admitted: list[str] = []
        turns_without_admission = 0
        while self._tenants:
            name = next(iter(self._tenants))  # the tenant whose turn it is
            tenant = self._tenants[name]
            if self._turn != name:
                self._turn = name
                tenant.deficit += self.config.quantum_tokens
            admitted_before = len(admitted)
            while (
                request := tenant.next_ready(excluded)
            ) is not None and request.cost_tokens <= tenant.deficit:
                if not self._fits(request):
                    return admitted  # the turn stays with this tenant until there is room
                self._start(tenant, request)
                admitted.append(request.request_id)
            self._end_turn(name)
            turns_without_admission = 0 if len(admitted) > admitted_before else turns_without_admission + 1
            if turns_without_admission >= len(self._tenants) and not self._short_of_credit_only(excluded):
                break
        return admitted

    def _end_turn(self, name: str) -> None:
        self._turn = None
        tenant = self._tenants.get(name)
        if tenant is None:
            return
        if not tenant.tasks:
            del self._tenants[name]
            return
        if tenant.next_ready(frozenset()) is None:
            tenant.deficit = 0  # an idle tenant does not bank credit
        self._tenants.move_to_end(name)

    def _short_of_credit_only(self, excluded: set[str]) -> bool:
        """Whether some tenant's next request would fit the batch but awaits more credit (more turns help)."""
        for tenant in self._tenants.values():
            request = tenant.next_ready(excluded)
            if request is not None and request.cost_tokens > tenant.deficit and self._fits(request):
                return True
        return False

    def _fits(self, request: R) -> bool:
        return (
            self._running < self.config.max_batch_size
            and self._running_tokens + self._charge(request) <= self.config.max_batch_tokens
        )

    def _charge(self, request: R) -> int:
        """What admitting ``request`` adds to the reservations: its cost, less what a running row shares."""
        shared = request.shared_key is not None and request.shared_key in self._sharing
        return request.cost_tokens - request.shared_tokens if shared else request.cost_tokens

    def _start(self, tenant: _TenantQueue[R], request: R) -> None:
        tenant.remove(request)  # an emptied tenant leaves the turn order at the end of its turn
        tenant.rotate_task(request.task_id)
        tenant.deficit -= request.cost_tokens
        self._running_tokens += self._charge(request)
        if request.shared_key is not None:
            self._sharing[request.shared_key] = self._sharing.get(request.shared_key, 0) + 1
        request.status = RequestStatus.RUNNING
        self._running += 1
