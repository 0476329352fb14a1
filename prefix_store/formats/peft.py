"""PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``): read, write. ``LORA`` adapters
are ``lora_format``'s; this module reads the prompt-learning ones and sends ``LORA`` there.

PEFT saves one tensor, ``prompt_embeddings``, for every prompt-learning method:

- ``PREFIX_TUNING``: ``[P, num_layers * 2 * kv_heads * head_dim]``, already projected when the adapter
  was trained with ``prefix_projection`` (the MLP is not saved), so both kinds read the same. Each row is
  laid out ``[num_layers, 2 (key, value), kv_heads, head_dim]``. In the config ``num_attention_heads`` is
  the model's key/value head count and ``token_dim`` = kv_heads × head_dim. Read as a ``Prefix``.
  An encoder-decoder's (``task_type`` ``SEQ_2_SEQ_LM``, ``num_transformer_submodules`` 2) has the same
  tensor, and PEFT feeds it to the decoder's self-attention only, decoder layer ``j`` getting the tensor's
  layer ``2j mod num_layers`` (``get_prompt`` doubles the layer axis and splits it in fours, whose second
  pairs go to a cross-attention cache that it then drops): so with an even layer count decoder layers ``j``
  and ``j + num_layers/2`` share one entry, and the odd entries are never read.
- ``PROMPT_TUNING`` and ``P_TUNING``: ``[P, token_dim]`` input embeddings, ``token_dim`` the model's
  embedding width (P-Tuning saves its prompt encoder's output, so both read the same). Read as a
  ``SoftPrompt``; a soft prompt is written as ``PROMPT_TUNING``.

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
from prefix_store.formats.lora_format import decode_peft_lora, encode_peft_lora
from prefix_store.formats.native import NATIVE_TENSOR_NAMES, check_soft_prompt_shape, require_fits
from prefix_store.formats.safetensors_check import (
    check_safetensors,
    excerpt,
    format_shape,
    load_checked_tensors,
)
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import Adapter, SoftPrompt
from prefix_store.storage.excerpt import excerpt_int

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_MODEL_NAME = "adapter_model.safetensors"
PROMPT_EMBEDDINGS = "prompt_embeddings"
SOFT_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
ACCEPTED_TYPES = ("PREFIX_TUNING", *SOFT_PROMPT_TYPES, "LORA")

_MISPLACED = {
    frozenset(NATIVE_TENSOR_NAMES): (
        "this is a native prefix file, not a PEFT adapter_model.safetensors; upload it as a native prefix"
    )
}


def decode_peft(
    adapter_config: bytes, adapter_model: bytes, geometry: ModelGeometry, limits: PrefixLimits
) -> Adapter:
    """Validate an untrusted PEFT adapter fully, then convert it: a ``Prefix`` for ``PREFIX_TUNING``, a
    ``SoftPrompt`` for ``PROMPT_TUNING`` and ``P_TUNING``, a ``LoraAdapter`` for ``LORA``.

    Raises ``PrefixValidationError`` (400, or 413 for oversize) naming the file and what is wrong.
    The tensors keep the file's floating dtype.
    """
    config = _parse_config(adapter_config, geometry, limits)
    if config["peft_type"] == "LORA":
        return decode_peft_lora(config, adapter_model, geometry, limits)
    peft_type, num_virtual_tokens = _check_config(config, geometry, limits)
    header = check_safetensors(
        adapter_model,
        expected_names=(PROMPT_EMBEDDINGS,),
        limits=limits,
        source=ADAPTER_MODEL_NAME,
        misplaced=_MISPLACED,
    )
    shape = header.tensors[PROMPT_EMBEDDINGS].shape
    if peft_type in SOFT_PROMPT_TYPES:
        rows = check_soft_prompt_shape(shape, geometry, f"{ADAPTER_MODEL_NAME}: tensor '{PROMPT_EMBEDDINGS}'")
        if rows != num_virtual_tokens:
            raise PrefixValidationError(
                f"{ADAPTER_MODEL_NAME}: tensor '{PROMPT_EMBEDDINGS}' has {excerpt_int(rows)} rows; "
                f"{ADAPTER_CONFIG_NAME} says num_virtual_tokens is {num_virtual_tokens}"
            )
        return SoftPrompt(load_checked_tensors(adapter_model, ADAPTER_MODEL_NAME, limits)[PROMPT_EMBEDDINGS])
    expected = (num_virtual_tokens, 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim)
    if shape != expected:
        raise PrefixValidationError(
            f"{ADAPTER_MODEL_NAME}: tensor '{PROMPT_EMBEDDINGS}' has shape {format_shape(shape)}; expected "
            f"[num_virtual_tokens, num_layers * 2 * token_dim] = {format_shape(expected)}"
        )
    embeddings = load_checked_tensors(adapter_model, ADAPTER_MODEL_NAME, limits)[PROMPT_EMBEDDINGS]
    rows = embeddings.view(
        num_virtual_tokens, geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim
    )  # [P, layers, key|value, kv_heads, head_dim]
    if geometry.encoder_decoder:
        rows = rows[:, seq2seq_layer_sources(geometry.num_layers)]  # each decoder layer's entry
    return Prefix(
        keys=rows[:, :, 0].permute(1, 2, 0, 3).contiguous(),  # [layers, kv_heads, P, head_dim]
        values=rows[:, :, 1].permute(1, 2, 0, 3).contiguous(),
    )


def seq2seq_layer_sources(num_layers: int) -> list[int]:
    """The entry of a ``SEQ_2_SEQ_LM`` prefix tensor's layer axis that PEFT feeds each decoder layer."""
    return [2 * layer % num_layers for layer in range(num_layers)]


def encode_peft(
    adapter: Adapter, geometry: ModelGeometry, base_model_name_or_path: str = ""
) -> dict[str, bytes]:
    """The files of an inference-mode PEFT adapter holding ``adapter``, by file name: ``PREFIX_TUNING`` for
    a prefix, ``PROMPT_TUNING`` for a soft prompt, ``LORA`` for a LoRA task.

    ``PeftModel.from_pretrained(base_model, folder)`` loads them; a prefix is written as already
    projected, so the config says ``prefix_projection: false`` whatever the prefix was trained with.
    """
    require_fits(adapter, geometry)
    if isinstance(adapter, LoraAdapter):
        return encode_peft_lora(adapter, geometry, base_model_name_or_path)
    config: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_layers": geometry.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": adapter.num_virtual_tokens,
        "revision": None,
        "task_type": "CAUSAL_LM",
    }
    if isinstance(adapter, SoftPrompt):
        embeddings = adapter.embeddings.detach().cpu().contiguous()  # [P, embedding_dim]
        config |= {
            "num_attention_heads": geometry.num_kv_heads,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "token_dim": geometry.embedding_dim,
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": None,
        }
    else:
        keys_values = torch.stack(
            [adapter.keys, adapter.values], dim=1
        )  # [layers, key|value, kv_heads, P, head_dim]
        if geometry.encoder_decoder:
            keys_values = _seq2seq_entries(keys_values)
            config |= {"num_transformer_submodules": 2, "task_type": "SEQ_2_SEQ_LM"}
        embeddings = (
            keys_values.detach()
            .cpu()
            .permute(3, 0, 1, 2, 4)
            .reshape(adapter.num_virtual_tokens, -1)
            .contiguous()
        )  # [P, layers * 2 * kv_heads * head_dim]
        token_dim = geometry.num_kv_heads * geometry.head_dim
        config |= {
            "encoder_hidden_size": token_dim,
            "init_weights": None,
            "num_attention_heads": geometry.num_kv_heads,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": False,
            "token_dim": token_dim,
        }
    return {
        ADAPTER_CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        ADAPTER_MODEL_NAME: safetensors.torch.save(
            {PROMPT_EMBEDDINGS: embeddings}, metadata={"format": "pt"}
        ),
    }


def _seq2seq_entries(keys_values: torch.Tensor) -> torch.Tensor:
    """A decoder prefix's per-layer ``[layers, 2, kv_heads, P, head_dim]`` as the entries of a ``SEQ_2_SEQ_LM``
    tensor (``seq2seq_layer_sources``; entries no layer reads are zeros). Raises ``PrefixValidationError``
    if two decoder layers that PEFT feeds one entry hold different keys or values."""
    entries = torch.zeros_like(keys_values)
    written: dict[int, int] = {}
    for layer, entry in enumerate(seq2seq_layer_sources(keys_values.shape[0])):
        if entry in written and not torch.equal(keys_values[written[entry]], keys_values[layer]):
            raise PrefixValidationError(
                f"decoder layers {written[entry]} and {layer} hold different keys or values, but a PEFT "
                "SEQ_2_SEQ_LM adapter feeds both the same: this prefix has no PEFT form"
            )
        written[entry] = layer
        entries[entry] = keys_values[layer]
    return entries


def write_peft_folder(
    adapter: Adapter, geometry: ModelGeometry, out_dir: Path, base_model_name_or_path: str = ""
) -> Path:
    """Write ``encode_peft``'s files into ``out_dir`` (created if missing); return ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in encode_peft(adapter, geometry, base_model_name_or_path).items():
        (out_dir / name).write_bytes(content)
    return out_dir


def _parse_config(adapter_config: bytes, geometry: ModelGeometry, limits: PrefixLimits) -> dict[str, Any]:
    """``adapter_config.json`` as an object of an accepted ``peft_type`` and ``task_type``."""
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
    if peft_type not in ACCEPTED_TYPES:
        got = "has no 'peft_type'" if peft_type is None else f"is a {_shown(peft_type)} adapter"
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME} {got}; only PEFT prompt-learning and LoRA adapters are accepted "
            f"({', '.join(ACCEPTED_TYPES)})"
        )
    task_type = "SEQ_2_SEQ_LM" if geometry.encoder_decoder else "CAUSAL_LM"
    if config.get("task_type") not in (None, task_type):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: task_type is {_shown(config['task_type'])}; this base model takes "
            f"{task_type} adapters"
        )
    return config


def _check_config(config: dict[str, Any], geometry: ModelGeometry, limits: PrefixLimits) -> tuple[str, int]:
    """Check a prompt-learning ``adapter_config.json`` against the geometry; return its ``peft_type`` and
    ``num_virtual_tokens``."""
    peft_type = config["peft_type"]
    task_type, submodules = ("SEQ_2_SEQ_LM", 2) if geometry.encoder_decoder else ("CAUSAL_LM", 1)
    if config.get("num_transformer_submodules") not in (None, submodules):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: num_transformer_submodules is "
            f"{_shown(config['num_transformer_submodules'])}; a {task_type} adapter has {submodules}"
        )
    if config.get("modules_to_save"):
        raise PrefixValidationError(
            f"{ADAPTER_CONFIG_NAME}: modules_to_save is set; an adapter may not change the frozen base model"
        )
    if peft_type in SOFT_PROMPT_TYPES:
        token_dim = _required_int(config, "token_dim")
        if token_dim != geometry.embedding_dim:
            raise PrefixValidationError(
                f"{ADAPTER_CONFIG_NAME}: token_dim is {excerpt_int(token_dim)} but must be "
                f"{geometry.embedding_dim} (the base model's embedding width)"
            )
        return peft_type, _num_virtual_tokens(config, limits)
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
                f"{ADAPTER_CONFIG_NAME}: {field} is {excerpt_int(value)} but must be {expected} ({meaning})"
            )
    return peft_type, _num_virtual_tokens(config, limits)


def _num_virtual_tokens(config: dict[str, Any], limits: PrefixLimits) -> int:
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
