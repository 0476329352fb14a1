"""Structural checks of an untrusted safetensors payload, done on the raw bytes before any tensor is built.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``), then the tensor data,
each tensor at ``data_offsets`` (begin, end) relative to the start of the data section.
Pickle (and torch's zip checkpoints, which hold a pickle) is recognised and refused, never opened.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.storage.excerpt import excerpt_int

FLOAT_DTYPES: Mapping[str, int] = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # name -> bytes per element

_HEADER_LENGTH_BYTES = 8
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # opcode PROTO, followed by the protocol number (2 to 5)
_SHOWN_NAMES = 8  # tensor names a message lists; the rest are counted


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it."""

    dtype: str  # safetensors dtype name, one of FLOAT_DTYPES once checked
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [begin, end) in bytes from the start of the data section


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a safetensors payload."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]  # the "__metadata__" object; empty when absent


def format_shape(shape: Collection[int]) -> str:
    """``[2, 4, 3, 16]``: how shapes are written in error messages (a huge dimension by its leading
    digits and its length: a header may declare any integer)."""
    return "[" + ", ".join(excerpt_int(d) for d in shape) + "]"


def excerpt(text: str, limit: int = 80) -> str:
    """``text`` quoted and cut to ``limit`` characters, for echoing untrusted strings in messages."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _quoted(names: Collection[str]) -> str:
    """The names, each cut, the first few only (a header may hold thousands)."""
    ordered = sorted(names)
    shown = ", ".join(excerpt(n) for n in ordered[:_SHOWN_NAMES])
    return shown if len(ordered) <= _SHOWN_NAMES else f"{shown}, … ({len(ordered)} in all)"


def check_safetensors(
    data: bytes,
    *,
    expected_names: Collection[str] | Callable[[Mapping[str, str], Collection[str]], Collection[str]],
    limits: PrefixLimits,
    source: str,
    misplaced: Mapping[frozenset[str], str] | None = None,
) -> SafetensorsHeader:
    """Check the structure of an untrusted safetensors payload without building any tensor.

    Checks, in order: total size (413), pickle / zip checkpoints, the header length (413 over
    ``limits.max_header_bytes``), the header JSON, the exact tensor names (``expected_names``, or a
    function of the metadata and the names found giving them: a format whose kinds hold different tensors), floating dtypes,
    and that every tensor's ``data_offsets`` tile the data section exactly. ``source`` names the payload in
    messages ("prefix file"). ``misplaced`` maps a set of tensor names that belongs to another format
    to an explanation shown instead of the generic wrong-names message.
    """
    limits.check_file_size(len(data), source)
    header_length = _header_length(data, limits, source)
    header = _parse_header_json(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + header_length], source)
    metadata = _metadata(header.pop("__metadata__", None), source)
    tensors = {name: _tensor_entry(name, entry, source) for name, entry in header.items()}
    expected = expected_names(metadata, set(tensors)) if callable(expected_names) else expected_names
    _check_names(set(tensors), set(expected), source, misplaced or {})
    for name, entry in tensors.items():
        _check_dtype_and_size(name, entry, source)
    _check_offsets(tensors, len(data) - _HEADER_LENGTH_BYTES - header_length, source)
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def load_checked_tensors(data: bytes, source: str, limits: PrefixLimits) -> dict[str, torch.Tensor]:
    """Build the tensors of a payload that passed ``check_safetensors``; refuse NaN and infinite values,
    then values over ``limits.max_abs_value`` (what the server's dtype carries through attention)."""
    try:
        tensors = load_safetensors_bytes(data)  # safetensors: no pickle, no code execution
    except Exception as exc:  # safetensors raises its own (Rust-side) error types
        raise PrefixValidationError(f"{source} could not be read as safetensors: {exc}") from None
    for name in sorted(tensors):
        _require_finite_and_bounded(name, tensors[name], source, limits)
    return tensors


def _foreign_format(data: bytes) -> str | None:
    if data.startswith(_ZIP_MAGIC):
        return "a zip archive (the format of torch.save checkpoints, which hold a pickle)"
    if len(data) >= 2 and data[0] == _PICKLE_PROTO and 2 <= data[1] <= 5:
        return "a pickle"
    return None


def _header_length(data: bytes, limits: PrefixLimits, source: str) -> int:
    available = len(data) - _HEADER_LENGTH_BYTES
    header_length = struct.unpack("<Q", data[:_HEADER_LENGTH_BYTES])[0] if available >= 0 else -1
    # A genuine safetensors file can start with 0x80 (a header length of 128 + 256k bytes), so the
    # pickle/zip sniff only speaks when the bytes do not already read as a safetensors header.
    plausible = 2 <= header_length <= available and data[_HEADER_LENGTH_BYTES] == ord("{")
    foreign = None if plausible else _foreign_format(data)
    if foreign is not None:
        raise PrefixValidationError(
            f"{source} is {foreign}, not safetensors: only safetensors files are accepted "
            "(pickle-based checkpoints can run code when loaded and are never opened)"
        )
    if available < 0:
        raise PrefixValidationError(
            f"{source} is {len(data)} bytes, too short to be a safetensors file "
            "(the 8-byte header length is missing)"
        )
    if header_length > available:
        raise PrefixValidationError(
            f"{source}: the header length field says {header_length} bytes but only {available} bytes follow "
            "it; the file is truncated or not safetensors"
        )
    if header_length > limits.max_header_bytes:
        raise PrefixValidationError(
            f"{source}: the safetensors header is {header_length} bytes, over the limit of "
            f"{limits.max_header_bytes} bytes",
            status=413,
        )
    if header_length < 2:
        raise PrefixValidationError(f"{source}: the header length field is {header_length}; not safetensors")
    return header_length


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {excerpt(key)}")
        result[key] = value
    return result


def _parse_header_json(raw: bytes, source: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PrefixValidationError(f"{source}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise PrefixValidationError(
            f"{source}: the safetensors header must be a JSON object, got {type(header).__name__}"
        )
    return header


def _metadata(raw: Any, source: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise PrefixValidationError(f"{source}: '__metadata__' must be a JSON object of strings")
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, entry: Any, source: str) -> TensorEntry:
    if not isinstance(entry, dict):
        raise PrefixValidationError(
            f"{source}: the header entry of tensor {excerpt(name)} is not a JSON object"
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise PrefixValidationError(f"{source}: tensor {excerpt(name)} has no string 'dtype' in the header")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise PrefixValidationError(
            f"{source}: tensor {excerpt(name)} has no valid 'shape' in the header "
            "(a list of non-negative integers)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise PrefixValidationError(
            f"{source}: tensor {excerpt(name)} has no valid 'data_offsets' in the header "
            "([begin, end] with 0 <= begin <= end)"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))


def _check_names(
    found: set[str], expected: set[str], source: str, misplaced: Mapping[frozenset[str], str]
) -> None:
    if found == expected:
        return
    explanation = misplaced.get(frozenset(found))
    if explanation is not None:
        raise PrefixValidationError(f"{source}: {explanation}")
    problems = []
    if expected - found:
        problems.append(f"missing {_quoted(expected - found)}")
    if found - expected:
        problems.append(f"unexpected {_quoted(found - expected)}")
    raise PrefixValidationError(
        f"{source}: expected exactly the tensors {_quoted(expected)}; {'; '.join(problems)}"
    )


def _check_dtype_and_size(name: str, entry: TensorEntry, source: str) -> None:
    itemsize = FLOAT_DTYPES.get(entry.dtype)
    if itemsize is None:
        raise PrefixValidationError(
            f"{source}: tensor '{name}' has dtype {excerpt(entry.dtype)}; only floating dtypes "
            f"({', '.join(FLOAT_DTYPES)}) are accepted"
        )
    declared = math.prod(entry.shape) * itemsize
    begin, end = entry.data_offsets
    if end - begin != declared:
        raise PrefixValidationError(
            f"{source}: tensor '{name}' is declared {entry.dtype} {format_shape(entry.shape)} "
            f"({excerpt_int(declared)} bytes) but its data_offsets span {excerpt_int(end - begin)} bytes"
        )


def _check_offsets(tensors: Mapping[str, TensorEntry], data_length: int, source: str) -> None:
    needed = max((e.data_offsets[1] for e in tensors.values()), default=0)
    if needed > data_length:
        raise PrefixValidationError(
            f"{source} is truncated: its tensors need {excerpt_int(needed)} bytes of data "
            f"but only {data_length} are present"
        )
    position, previous = 0, None
    for name, entry in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin, end = entry.data_offsets
        if begin < position:
            raise PrefixValidationError(f"{source}: the data of tensors '{previous}' and '{name}' overlap")
        if begin > position:
            raise PrefixValidationError(
                f"{source}: {excerpt_int(begin - position)} unused bytes before tensor '{name}'"
            )
        position, previous = end, name
    if data_length > position:
        raise PrefixValidationError(
            f"{source}: {data_length - position} unexpected bytes after the last tensor"
        )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. ``aminmax`` propagates NaN and meets any infinity at one end, and is
    several times cheaper than ``isfinite(...).all()`` (no boolean temporary of the tensor's size)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _require_finite_and_bounded(name: str, tensor: torch.Tensor, source: str, limits: PrefixLimits) -> None:
    """Refuse NaN and infinities, then a largest |x| over ``limits.max_abs_value``: one ``aminmax`` (see
    ``all_finite``) gives both."""
    if tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor.detach())
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise PrefixValidationError(
            f"{source}: tensor '{name}' contains non-finite values ({nan} NaN, {inf} infinite); "
            "every value must be finite"
        )
    limits.check_magnitude(max(-float(low), float(high)), f"{source}: tensor '{name}'")
