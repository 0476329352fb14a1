"""The one exception root of ``server.training``; the CLI turns these into a message and an exit status."""

from __future__ import annotations


class TrainingError(Exception):
    """Root of every error the training package raises on purpose; the message is for the user."""


class TrainingDataError(TrainingError):
    """A training or evaluation file is unreadable or has a bad line (the message names the line)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or does not belong to the run being resumed."""


class PushError(TrainingError):
    """Uploading the trained prefix to a server failed."""
