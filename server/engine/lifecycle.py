"""The lifecycle of a request in the engine: where it is (``RequestStatus``) and how it ended
(``FinishReason``)."""

from enum import StrEnum


class RequestStatus(StrEnum):
    WAITING_FOR_PREFIX = "waiting_for_prefix"  # queued; its prefix is being loaded and pinned
    WAITING = "waiting"  # queued; prefix resident, waiting for a slot in the batch
    RUNNING = "running"  # a row of the running batch
    FINISHED = "finished"  # ended (see the finish reason); the scheduler has forgotten it


class FinishReason(StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence appeared in the text
    EOS = "eos"  # the model produced an end-of-sequence token
    ABORTED = "aborted"  # the client went away, cancelled, or the server shut down
    DEADLINE = "deadline"  # the request's deadline passed before it finished
    ERROR = "error"  # the engine failed while running it (the message is logged)
    GRAMMAR = "grammar"  # its grammar (structured output) could go no further: a limit of its schema

    @property
    def completed(self) -> bool:
        """The request ran to its end (length, stop sequence or EOS) rather than being cut short."""
        return self in (FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS)
