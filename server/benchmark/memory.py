"""How much device memory a task takes: bytes per virtual token (keys and values of every layer), per 20-token
prefix and per LoRA task of rank 16 on q/k/v/o, for the demo model and Llama geometries, and how many fit in
a budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_store.geometry import ModelGeometry
from server.demo_model import build_demo_tokenizer, demo_model_config

TYPICAL_PREFIX_TOKENS = 20
TYPICAL_LORA_RANK = 16  # on q_proj, k_proj, v_proj and o_proj of every layer

LLAMA_CONFIGS = {  # the published shapes (weights are never built: parameters are counted on "meta")
    "Llama-3.2-1B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "Llama-3.1-8B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "Llama-3.1-70B": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
}


@dataclass(frozen=True)
class PrefixMemory:
    """One model's row of the table."""

    model: str
    geometry: str  # layers x kv heads x head_dim
    dtype: str
    parameters: int
    bytes_per_virtual_token: int
    bytes_per_prefix: int  # TYPICAL_PREFIX_TOKENS virtual tokens
    prefix_share_of_weights: float  # a prefix's bytes / the model's weight bytes (same dtype)
    prefixes_in_budget: int
    bytes_per_lora: int  # a LoRA task of TYPICAL_LORA_RANK on the attention projections
    loras_in_budget: int


def memory_table(budget_bytes: int) -> list[PrefixMemory]:
    """The demo model (float32, as it is served) and the Llama geometries (bfloat16)."""
    demo = demo_model_config(vocab_size=len(build_demo_tokenizer()), eos_token_id=0, pad_token_id=0)
    rows = [_row("demo", demo, torch.float32, budget_bytes)]
    for name, sizes in LLAMA_CONFIGS.items():
        rows.append(_row(name, LlamaConfig(vocab_size=128256, **sizes), torch.bfloat16, budget_bytes))
    return rows


def _row(name: str, config: LlamaConfig, dtype: torch.dtype, budget_bytes: int) -> PrefixMemory:
    geometry = ModelGeometry.from_config(config)
    itemsize = dtype.itemsize
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    per_token = geometry.bytes_per_virtual_token(itemsize)
    per_prefix = TYPICAL_PREFIX_TOKENS * per_token
    per_lora = lora_bytes(config, TYPICAL_LORA_RANK, itemsize)
    return PrefixMemory(
        model=name,
        geometry=f"{geometry.num_layers}x{geometry.num_kv_heads}x{geometry.head_dim}",
        dtype=str(dtype).removeprefix("torch."),
        parameters=parameters,
        bytes_per_virtual_token=per_token,
        bytes_per_prefix=per_prefix,
        prefix_share_of_weights=per_prefix / (parameters * itemsize),
        prefixes_in_budget=budget_bytes // per_prefix,
        bytes_per_lora=per_lora,
        loras_in_budget=budget_bytes // per_lora,
    )


def lora_bytes(config: LlamaConfig, rank: int, itemsize: int) -> int:
    """Bytes of a LoRA task of ``rank`` on q/k/v/o of every layer: ``A`` ``[r, in]`` and ``B`` ``[out, r]``
    per projection."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    queries = config.num_attention_heads * head_dim
    keys = config.num_key_value_heads * head_dim
    # q: hidden -> queries, k and v: hidden -> keys, o: queries -> hidden
    per_layer = rank * ((hidden + queries) + 2 * (hidden + keys) + (queries + hidden))
    return config.num_hidden_layers * per_layer * itemsize
