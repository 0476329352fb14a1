"""The native prefix file of docs/API.md: safetensors with string metadata and, by its ``kind``:

- a prefix (``kind`` absent or ``prefix``): ``keys``/``values``
  ``[num_layers, num_kv_heads, num_virtual_tokens, head_dim]``;
- a soft prompt (``kind`` = ``soft_prompt``): ``embeddings`` ``[num_virtual_tokens, embedding_dim]``;
- a LoRA task (``kind`` = ``lora``): ``<module>.lora_A`` / ``<module>.lora_B`` per adapted projection
  (``lora_format``).

Metadata ``format`` = ``prefix-serve/1``, ``num_virtual_tokens``, ``base_model`` = the geometry's
fingerprint (a soft prompt's width is checked against the model's embeddings too).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection, Mapping

import safetensors.torch
import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.lora_format import (
    LORA_KIND,
    decode_native_lora,
    encode_native_lora,
    native_lora_names,
)
from prefix_store.formats.safetensors_check import (
    TensorEntry,
    check_safetensors,
    excerpt,
    format_shape,
    load_checked_tensors,
)
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import Adapter, SoftPrompt, kind_of
from prefix_store.storage.excerpt import excerpt_int

NATIVE_FORMAT = "prefix-serve/1"
NATIVE_TENSOR_NAMES = ("keys", "values")
SOFT_PROMPT_TENSOR = "embeddings"
_TENSORS_OF_KIND = {"prefix": NATIVE_TENSOR_NAMES, "soft_prompt": (SOFT_PROMPT_TENSOR,)}

_SOURCE = "prefix file"
_MISPLACED = {
    frozenset({"prompt_embeddings"}): (
        "this is a PEFT adapter_model.safetensors, not a native prefix; upload it as a PEFT adapter "
        "together with its adapter_config.json"
    )
}
_DECIMAL = re.compile(r"[0-9]{1,9}")


def require_fits(adapter: Adapter, geometry: ModelGeometry) -> None:
    """Refuse to serialise a task whose tensors do not have the geometry's shapes."""
    if adapter.fits(geometry):
        return
    if isinstance(adapter, LoraAdapter):
        raise PrefixValidationError(
            f"a LoRA task of modules {sorted(adapter.modules)[:3]}… does not fit the projections of the base "
            f"model {geometry.fingerprint}"
        )
    if isinstance(adapter, SoftPrompt):
        raise PrefixValidationError(
            f"a soft prompt of embeddings {format_shape(adapter.embeddings.shape)} does not fit the base "
            f"model's embeddings of width {geometry.embedding_dim}"
        )
    raise PrefixValidationError(
        f"a prefix with keys {format_shape(adapter.keys.shape)} and values "
        f"{format_shape(adapter.values.shape)} does not fit the base model {geometry.fingerprint}"
    )


def encode_native(adapter: Adapter, geometry: ModelGeometry) -> bytes:
    """Serialise a prefix, a soft prompt or a LoRA task as a native file for the base model of ``geometry``."""
    require_fits(adapter, geometry)
    metadata = {
        "format": NATIVE_FORMAT,
        "num_virtual_tokens": str(adapter.num_virtual_tokens),
        "base_model": geometry.fingerprint,
    }
    if isinstance(adapter, LoraAdapter):
        tensors, lora_metadata = encode_native_lora(adapter)
        metadata |= lora_metadata
    elif isinstance(adapter, SoftPrompt):
        tensors = {SOFT_PROMPT_TENSOR: adapter.embeddings}
        metadata["kind"] = kind_of(adapter)
    else:
        tensors = {"keys": adapter.keys, "values": adapter.values}
    # safetensors refuses non-contiguous tensors and tensors that share storage: give each its own copy.
    tensors = {
        name: tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
        for name, tensor in tensors.items()
    }
    return canonical_header(safetensors.torch.save(tensors, metadata=metadata))


def canonical_header(data: bytes) -> bytes:
    """``data`` with its safetensors header rewritten with sorted keys (safetensors writes the metadata
    in hash order), so the same prefix always encodes to the same bytes and the same sha256: a
    re-upload of an unchanged prefix then shares its content-addressed blob."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def decode_native(data: bytes, geometry: ModelGeometry, limits: PrefixLimits) -> Adapter:
    """Validate an untrusted native file fully, then build its prefix, soft prompt or LoRA task.

    Raises ``PrefixValidationError`` (status 400, or 413 for oversize) naming what is wrong. The tensors
    keep the file's floating dtype (keys and values promoted to a common one); callers cast with ``to``.
    """
    header = check_safetensors(
        data, expected_names=_tensors_of_kind, limits=limits, source=_SOURCE, misplaced=_MISPLACED
    )
    _check_format_and_base_model(header.metadata, geometry)
    if header.metadata.get("kind") == LORA_KIND:
        return decode_native_lora(data, header, geometry, limits)
    soft = SOFT_PROMPT_TENSOR in header.tensors
    if soft:
        num_virtual_tokens = check_soft_prompt_shape(
            header.tensors[SOFT_PROMPT_TENSOR].shape, geometry, _SOURCE
        )
    else:
        num_virtual_tokens = _check_shapes(header.tensors["keys"], header.tensors["values"], geometry)
    limits.check_num_virtual_tokens(num_virtual_tokens, _SOURCE)
    _check_declared_num_virtual_tokens(header.metadata, num_virtual_tokens)
    tensors = load_checked_tensors(data, _SOURCE, limits)
    if soft:
        return SoftPrompt(tensors[SOFT_PROMPT_TENSOR])
    dtype = torch.promote_types(tensors["keys"].dtype, tensors["values"].dtype)
    return Prefix(keys=tensors["keys"].to(dtype), values=tensors["values"].to(dtype))


def _tensors_of_kind(metadata: Mapping[str, str], found: Collection[str]) -> Collection[str]:
    kind = metadata.get("kind", "prefix")
    if kind == LORA_KIND:
        return native_lora_names(found)
    if kind not in _TENSORS_OF_KIND:
        raise PrefixValidationError(
            f"{_SOURCE} has metadata kind {excerpt(kind)}; expected 'prefix', 'soft_prompt' or 'lora'"
        )
    return _TENSORS_OF_KIND[kind]


def check_soft_prompt_shape(shape: tuple[int, ...], geometry: ModelGeometry, source: str) -> int:
    """Check a soft prompt's ``[num_virtual_tokens, embedding_dim]`` against the model; return P."""
    if geometry.encoder_decoder:
        raise PrefixValidationError(
            f"{source}: soft prompts are served on decoder-only models; this base model is an "
            f"encoder-decoder ({geometry.model_type}), which takes prefixes"
        )
    if geometry.embedding_dim is None:
        raise PrefixValidationError(
            f"{source}: the base model's embedding width is unknown; soft prompts need it"
        )
    if len(shape) != 2 or shape[1] != geometry.embedding_dim:
        raise PrefixValidationError(
            f"{source}: a soft prompt's embeddings have shape {format_shape(shape)}; expected "
            f"[num_virtual_tokens, {geometry.embedding_dim}] (the base model's embedding width)"
        )
    return shape[0]


def _check_format_and_base_model(metadata: dict[str, str], geometry: ModelGeometry) -> None:
    fmt = metadata.get("format")
    if fmt != NATIVE_FORMAT:
        got = "no 'format' metadata" if fmt is None else f"metadata format {excerpt(fmt)}"
        raise PrefixValidationError(f"{_SOURCE} has {got}; expected format '{NATIVE_FORMAT}'")
    base_model = metadata.get("base_model")
    if base_model is None:
        raise PrefixValidationError(
            f"{_SOURCE} has no 'base_model' metadata; expected '{geometry.fingerprint}'"
        )
    if base_model != geometry.fingerprint:
        raise PrefixValidationError(
            f"{_SOURCE} was made for base model {excerpt(base_model)} "
            f"but the base model is '{geometry.fingerprint}'"
        )


def _check_shapes(keys: TensorEntry, values: TensorEntry, geometry: ModelGeometry) -> int:
    """Check both tensors against the geometry; return the number of virtual tokens."""
    for name, entry in (("keys", keys), ("values", values)):
        shape = entry.shape
        if len(shape) != 4:
            raise PrefixValidationError(
                f"{_SOURCE}: tensor '{name}' has shape {format_shape(shape)}; expected 4 dimensions "
                "[num_layers, num_kv_heads, num_virtual_tokens, head_dim]"
            )
        for dim, what, expected in (
            (0, "layers", geometry.num_layers),
            (1, "key/value heads", geometry.num_kv_heads),
            (3, "head_dim", geometry.head_dim),
        ):
            if shape[dim] != expected:
                raise PrefixValidationError(
                    f"{_SOURCE}: tensor '{name}' has {excerpt_int(shape[dim])} {what} (dim {dim} of "
                    f"{format_shape(shape)}) but the base model has {expected}"
                )
    if keys.shape != values.shape:
        raise PrefixValidationError(
            f"{_SOURCE}: tensors 'keys' {format_shape(keys.shape)} and 'values' "
            f"{format_shape(values.shape)} differ in shape"
        )
    return keys.shape[2]


def _check_declared_num_virtual_tokens(metadata: dict[str, str], num_virtual_tokens: int) -> None:
    declared = metadata.get("num_virtual_tokens")
    if declared is None:
        raise PrefixValidationError(f"{_SOURCE} has no 'num_virtual_tokens' metadata")
    if not _DECIMAL.fullmatch(declared):
        raise PrefixValidationError(
            f"{_SOURCE}: metadata num_virtual_tokens {excerpt(declared)} is not an integer"
        )
    if int(declared) != num_virtual_tokens:
        raise PrefixValidationError(
            f"{_SOURCE}: metadata num_virtual_tokens is {int(declared)} but the tensors hold "
            f"{num_virtual_tokens} virtual tokens (dim 2)"
        )
