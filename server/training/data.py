"""Training data: JSONL lines ``{"prompt": str, "completion": str}``, tokenised and checked up front.

Every line is validated before training starts (and before anything is written), in two passes so that
a bad file fails fast: ``read_records`` needs nothing but the file (a missing or unreadable file,
malformed JSON, a missing, non-string or empty field) and runs before any part of the model is read;
``tokenize_records`` needs only the tokenizer (an example whose prefix + prompt + completion does not fit
the model's positions) and runs before the weights are loaded. Each refusal names the file and the line.
Blank lines are skipped; other keys on a line are ignored.

The prompt is tokenised exactly as the server tokenises a prompt; the completion is tokenised on its
own (no special tokens) and followed by the end-of-sequence token, so a trained task also learns to
stop. Loss is taken on completion tokens only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.training.errors import TrainingDataError

FIELDS = ("prompt", "completion")


@dataclass(frozen=True)
class Example:
    """One tokenised training example."""

    line: int  # 1-based line number in its file
    prompt_ids: tuple[int, ...]  # at least one token
    completion_ids: tuple[int, ...]  # at least one token; ends with EOS when the tokenizer has one

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class Dataset:
    """The examples of one file, with the file's digest (a resumed run must see the same data)."""

    path: Path
    sha256: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class Record:
    """One line's fields, checked to be non-empty strings (not tokenised yet)."""

    line: int  # 1-based line number in its file
    prompt: str
    completion: str


@dataclass(frozen=True)
class RecordFile:
    """A JSONL file read and parsed; every check that needs no tokenizer has passed."""

    path: Path
    sha256: str
    records: tuple[Record, ...]


def read_records(path: Path) -> RecordFile:
    """Read and parse every line of ``path`` (no tokenizer, no model): raises ``TrainingDataError`` naming
    the file, and the first bad line, if it is missing, unreadable, malformed or holds no examples."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainingDataError(f"cannot read {path}: {exc.strerror}") from None
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            prompt, completion = _parse_line(raw, f"{path} line {number}")
            records.append(Record(number, prompt, completion))
    if not records:
        raise TrainingDataError(f"{path} holds no examples (one JSON object per line)")
    return RecordFile(path=path, sha256=hashlib.sha256(data).hexdigest(), records=tuple(records))


def tokenize_records(
    file: RecordFile,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_virtual_tokens: int,
    max_positions: int | None,
) -> Dataset:
    """Tokenise every record and check that it fits the model; raises ``TrainingDataError`` naming the line."""
    eos = tokenizer.eos_token_id
    examples = []
    for record in file.records:
        example = Example(
            line=record.line,
            prompt_ids=tuple(tokenizer(record.prompt).input_ids),
            completion_ids=tuple(tokenizer(record.completion, add_special_tokens=False).input_ids)
            + ((eos,) if eos is not None else ()),
        )
        _check_fits(example, f"{file.path} line {record.line}", num_virtual_tokens, max_positions)
        examples.append(example)
    return Dataset(path=file.path, sha256=file.sha256, examples=tuple(examples))


def load_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_virtual_tokens: int,
    max_positions: int | None,
) -> Dataset:
    """``read_records`` then ``tokenize_records``: the whole file, validated and tokenised."""
    return tokenize_records(
        read_records(path), tokenizer, num_virtual_tokens=num_virtual_tokens, max_positions=max_positions
    )


def _parse_line(raw: bytes, where: str) -> tuple[str, str]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TrainingDataError(f"{where}: not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise TrainingDataError(f"{where}: malformed JSON ({exc})") from None
    if not isinstance(record, dict):
        raise TrainingDataError(
            f'{where}: expected a JSON object {{"prompt": ..., "completion": ...}}, got {type(record).__name__}'
        )
    values = []
    for field in FIELDS:
        if field not in record:
            raise TrainingDataError(f"{where}: missing field '{field}'")
        value = record[field]
        if not isinstance(value, str):
            raise TrainingDataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        if not value:
            raise TrainingDataError(f"{where}: field '{field}' is empty")
        values.append(value)
    return values[0], values[1]


def _check_fits(example: Example, where: str, num_virtual_tokens: int, max_positions: int | None) -> None:
    if not example.prompt_ids:
        raise TrainingDataError(f"{where}: the prompt has no tokens")
    if not example.completion_ids:
        raise TrainingDataError(f"{where}: the completion has no tokens")
    needed = num_virtual_tokens + example.num_tokens
    if max_positions is not None and needed > max_positions:
        raise TrainingDataError(
            f"{where}: too long for the model: prefix ({num_virtual_tokens}) + prompt "
            f"({len(example.prompt_ids)}) + completion ({len(example.completion_ids)}) tokens = {needed} "
            f"positions, but the model supports {max_positions}"
        )


def epoch_batches(
    examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int
) -> list[list[Example]]:
    """The batches of one epoch, shuffled by ``(seed, epoch)`` alone, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [
        [examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)
    ]


def in_order_batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Batches in file order (evaluation)."""
    return [list(examples[start : start + batch_size]) for start in range(0, len(examples), batch_size)]
