"""What an upload sends, checked locally first as far as that is possible without torch.

A native prefix, soft prompt or LoRA task is one ``.safetensors`` file; a PEFT adapter is a folder with
``adapter_config.json`` (``peft_type`` ``PREFIX_TUNING``, ``PROMPT_TUNING``, ``P_TUNING`` or ``LORA``) and
``adapter_model.safetensors``. Here we check the structure (the
safetensors header, the config's type, the tensor names) so that common mistakes fail at once with a
clear message; shapes, dtypes and values are checked against the base model by the server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._exceptions import InvalidInputError

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_MODEL_NAME = "adapter_model.safetensors"
_NATIVE_TENSORS = {"prefix": ("keys", "values"), "soft_prompt": ("embeddings",)}  # by metadata kind
PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "LORA")  # the methods served
NATIVE_FORMAT = "prefix-serve/1"

_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own bound
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")  # a pickle (protocol 2+), a torch.save zip archive
_NO_PICKLES = (
    "pickle checkpoints are never loaded (they can run code); save a safetensors file instead "
    "(PEFT: save_pretrained(..., safe_serialization=True))"
)

Multipart = list[tuple[str, tuple[str, bytes, str]]]  # (field, (filename, content, content type))


@dataclass(frozen=True)
class PreparedUpload:
    """The multipart fields of ``PUT /v1/admin/prefixes/{task_id}`` for a checked prefix."""

    files: Multipart
    source_format: str  # "native" or "peft"


def prepare_upload(path: str | os.PathLike[str]) -> PreparedUpload:
    """Read and check a native ``.safetensors`` file or a PEFT adapter folder; raise ``InvalidInputError``."""
    path = Path(path)
    if path.is_dir():
        return _prepare_peft_folder(path)
    if path.is_file():
        return _prepare_native_file(path)
    raise InvalidInputError(f"{path}: no such file or folder")


def _prepare_native_file(path: Path) -> PreparedUpload:
    if path.name == PEFT_CONFIG_NAME:
        raise InvalidInputError(f"{path}: this is a PEFT adapter config; upload its folder instead")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise InvalidInputError(f"{path}: {_NO_PICKLES}")
    data = _read(path)
    tensors, metadata = check_safetensors(data, str(path))
    if "prompt_embeddings" in tensors:
        raise InvalidInputError(
            f"{path}: this is a PEFT adapter_model.safetensors, not a native prefix; upload the folder "
            f"that holds it and its {PEFT_CONFIG_NAME}"
        )
    kind = metadata.get("kind", "prefix")
    expected = _NATIVE_TENSORS.get(kind)
    if kind == "lora":
        expected = ()
        if not tensors or not all(name.endswith((".lora_A", ".lora_B")) for name in tensors):
            raise InvalidInputError(
                f"{path}: a native LoRA task holds '<module>.lora_A' and '<module>.lora_B' tensors only"
            )
    elif expected is None:
        raise InvalidInputError(f"{path}: metadata kind {kind!r} is not 'prefix', 'soft_prompt' or 'lora'")
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise InvalidInputError(
            f"{path}: a native {kind.replace('_', ' ')} holds tensors {' and '.join(map(repr, expected))}; "
            f"missing: {', '.join(missing)}"
        )
    if metadata.get("format") != NATIVE_FORMAT:
        raise InvalidInputError(
            f"{path}: a native prefix has metadata format '{NATIVE_FORMAT}', "
            f"this file has {metadata.get('format')!r}"
        )
    return PreparedUpload([("file", (path.name, data, "application/octet-stream"))], "native")


def _prepare_peft_folder(folder: Path) -> PreparedUpload:
    config_path, model_path = folder / PEFT_CONFIG_NAME, folder / PEFT_MODEL_NAME
    if not config_path.is_file():
        raise InvalidInputError(
            f"{folder}: no {PEFT_CONFIG_NAME}; a PEFT adapter folder holds {PEFT_CONFIG_NAME} and "
            f"{PEFT_MODEL_NAME} (or pass a native .safetensors file)"
        )
    config_bytes = _read(config_path)
    peft_type = _peft_type(config_bytes, config_path)
    if peft_type not in PEFT_TYPES:
        raise InvalidInputError(
            f"{config_path}: peft_type is {peft_type!r}; PrefixServe serves {', '.join(PEFT_TYPES)} adapters only"
        )
    if not model_path.is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
        hint = f" (found {', '.join(sorted(pickled))}: {_NO_PICKLES})" if pickled else ""
        raise InvalidInputError(f"{folder}: no {PEFT_MODEL_NAME}{hint}")
    model_bytes = _read(model_path)
    tensors, _ = check_safetensors(model_bytes, str(model_path))
    if peft_type == "LORA":
        if not any(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in tensors):
            found = ", ".join(sorted(tensors)[:5]) or "none"
            raise InvalidInputError(
                f"{model_path}: a LORA adapter holds '….lora_A.weight' and '….lora_B.weight' tensors; found: {found}"
            )
    elif "prompt_embeddings" not in tensors:
        found = ", ".join(sorted(tensors)[:5]) or "none"
        raise InvalidInputError(
            f"{model_path}: a {peft_type} adapter holds the tensor 'prompt_embeddings'; found: {found}"
        )
    files: Multipart = [
        ("adapter_config", (PEFT_CONFIG_NAME, config_bytes, "application/json")),
        ("adapter_model", (PEFT_MODEL_NAME, model_bytes, "application/octet-stream")),
    ]
    return PreparedUpload(files, "peft")


def _peft_type(config_bytes: bytes, path: Path) -> object:
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path}: expected a JSON object")
    return config.get("peft_type")


def check_safetensors(data: bytes, source: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, after checking its header's structure:
    the 8-byte length, a JSON object within the file, and every tensor's offsets within the data."""
    if data.startswith(_PICKLE_MAGICS):
        raise InvalidInputError(f"{source}: this is a pickle checkpoint, not safetensors; {_NO_PICKLES}")
    if len(data) < 8:
        raise InvalidInputError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InvalidInputError(
            f"{source}: not a safetensors file (its header claims {header_size} bytes, "
            f"the file has {len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError(f"{source}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{source}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInputError(f"{source}: safetensors metadata must map names to strings")
    body_size = len(data) - 8 - header_size
    for name, entry in header.items():
        if not _valid_entry(entry, body_size):
            raise InvalidInputError(f"{source}: tensor {name!r} has a malformed safetensors header entry")
    return header, metadata


def _valid_entry(entry: object, body_size: int) -> bool:
    if not isinstance(entry, dict):
        return False
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= body_size
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror})") from None
