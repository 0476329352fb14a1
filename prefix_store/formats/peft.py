"""PEFT ``PREFIX_TUNING`` adapters (``adapter_config.json`` + ``adapter_model.safetensors``): read, write.

PEFT saves one tensor, ``prompt_embeddings`` ``[P, num_layers * 2 * kv_heads * head_dim]``, already
projected when the adapter was trained with ``prefix_projection`` (the MLP is not saved), so both kinds
read the same. Each row is laid out ``[num_layers, 2 (key, value), kv_heads, head_dim]``. In the config
``num_attention_heads`` is the model's key/value head count and ``token_dim`` = kv_heads × head_dim.
peft itself is not imported: it is a test dependency only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import NATIVE_TENSOR_NAMES, require_fits
from prefix_store.formats.safetensors_check import (
    check_safetensors,
    excerpt,
    format_shape,
    load_checked_tensors,
)
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_MODEL_NAME = "adapter_model.safetensors"
PROMPT_EMBEDDINGS = "prompt_embeddings"

_MISPLACED = {
    frozenset(NATIVE_TENSOR_NAMES): (
        "this is a native prefix file, not a PEFT adapter_model.safetensors; upload it as a native prefix"
    )
}


def decode_peft(
    adapter_config: bytes, adapter_model: bytes, geometry: ModelGeometry, limits: PrefixLimits
) -> Prefix:
    """Validate an untrusted PEFT prefix-tuning adapter fully, then convert it to a ``Prefix``.

    Raises ``PrefixValidationError`` (400, or 413 for oversize) naming the file and what is wrong.
    The tensors keep the file's floating dtype.
    """
    num_virtual_tokens = _check_config(adapter_config, geometry, limits)
    header = check_safetensors(
        adapter_model,
        expected_names=(PROMPT_EMBEDDINGS,),
        limits=limits,
        source=ADAPTER_MODEL_NAME,
        misplaced=_MISPLACED,
    )
    expected = (num_virtual_tokens, 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim)
    shape = header.tensors[PROMPT_EMBEDDINGS].shape
    if shape != expected:
        raise PrefixValidationError(
            f"{ADAPTER_MODEL_NAME}: tensor '{PROMPT_EMBEDDINGS}' has shape {format_shape(shape)}; expected "
            f"[num_virtual_tokens, num_layers * 2 * token_dim] = {format_shape(expected)}"
        )
    embeddings = load_checked_tensors(adapter_model, ADAPTER_MODEL_NAME)[PROMPT_EMBEDDINGS]
    rows = embeddings.view(
        num_virtual_tokens, geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim
    )  # [P, layers, key|value, kv_heads, head_dim]
    return Prefix(
        keys=rows[:, :, 0].permute(1, 2, 0, 3).contiguous(),  # [layers, kv_heads, P, head_dim]
        values=rows[:, :, 1].permute(1, 2, 0, 3).contiguous(),
    )


def encode_peft(
    prefix: Prefix, geometry: ModelGeometry, base_model_name_or_path: str = ""
) -> dict[str, bytes]:
    """The files of an inference-mode PEFT ``PREFIX_TUNING`` adapter holding ``prefix``, by file name.

    ``PeftModel.from_pretrained(base_model, folder)`` loads them; the prefix is written as already
    projected, so the config says ``prefix_projection: false`` whatever the prefix was trained with.
    """
    require_fits(prefix, geometry)
    num_virtual_tokens = prefix.num_virtual_tokens
    keys_values = torch.stack(
        [prefix.keys, prefix.values], dim=1
    )  # [layers, key|value, kv_heads, P, head_dim]
    embeddings = (
        keys_values.detach().cpu().permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1).contiguous()
    )  # [P, layers * 2 * kv_heads * head_dim]
    token_dim = geometry.num_kv_heads * geometry.head_dim
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": geometry.num_kv_heads,
        "num_layers": geometry.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }
    return {
        ADAPTER_CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        ADAPTER_MODEL_NAME: safetensors.torch.save(
            {PROMPT_EMBEDDINGS: embeddings}, metadata={"format": "pt"}
        ),
    }


def write_peft_folder(
    prefix: Prefix, geometry: ModelGeometry, out_dir: Path, base_model_name_or_path: str = ""
) -> Path:
    """Write ``encode_peft``'s files into ``out_dir`` (created if missing); return ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in encode_peft(prefix, geometry, base_model_name_or_path).items():
        (out_dir / name).write_bytes(content)
    return out_dir


def _check_config(adapter_config: bytes, geometry: ModelGeometry, limits: PrefixLimits) -> int:
    """Check ``adapter_config.json`` against the geometry; return its ``num_virtual_tokens``."""
    limits.check_config_size(len(adapter_config), ADAPTER_CONFIG_NAME)
    try:
        config = json.loads(adapter_config.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PrefixValidationError(f"{ADAPTER_CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME} must be a JSON object, got {type(config).__name__}"
        )
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        got = "has no 'peft_type'" if peft_type is None else f"is a {_shown(peft_type)} adapter"
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME} {got}; only PEFT PREFIX_TUNING adapters are accepted"
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: task_type is {_shown(task_type)}; only CAUSAL_LM adapters are accepted"
        )
    if config.get("num_transformer_submodules") not in (None, 1):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: num_transformer_submodules is "
            f"{_shown(config['num_transformer_submodules'])}; a causal LM adapter has 1"
        )
    if config.get("modules_to_save"):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: modules_to_save is set; an adapter may not change the frozen base model"
        )
    token_dim = geometry.num_kv_heads * geometry.head_dim
    for field, expected, meaning in (
        ("num_layers", geometry.num_layers, "the base model's layers"),
        ("num_attention_heads", geometry.num_kv_heads, "the base model's key/value heads"),
        (
            "token_dim",
            token_dim,
            f"key/value heads × head_dim = {geometry.num_kv_heads} × {geometry.head_dim}",
        ),
    ):
        value = _required_int(config, field)
        if value != expected:
            raise PrefixValidationError(
                f"{ADAPTER_CONFIG_NAME}: {field} is {value} but must be {expected} ({meaning})"
            )
    num_virtual_tokens = _required_int(config, "num_virtual_tokens")
    limits.check_num_virtual_tokens(num_virtual_tokens, ADAPTER_CONFIG_NAME)
    return num_virtual_tokens


def _required_int(config: dict[str, Any], field: str) -> int:
    if field not in config or config[field] is None:
        raise PrefixValidationError(f"{ADAPTER_CONFIG_NAME} has no '{field}'")
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool):
        raise PrefixValidationError(f"{ADAPTER_CONFIG_NAME}: {field} must be an integer, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return excerpt(value)
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:80] + "…"
