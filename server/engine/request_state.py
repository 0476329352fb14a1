"""The lifecycle of a request in the engine."""

from enum import StrEnum


class RequestStatus(StrEnum):
    WAITING_FOR_PREFIX = "waiting_for_prefix"  # queued; its prefix is being loaded and pinned
    WAITING = "waiting"  # queued; prefix resident, waiting for a slot in the batch
    RUNNING = "running"  # a row of the running batch
    FINISHED = "finished"  # ended (see the finish reason); the scheduler has forgotten it
