"""Prefix size against the base model, from the config alone."""

from __future__ import annotations

from transformers import LlamaConfig

from server.engine.base_model import BaseModel
from server.training.sizes import base_parameter_count, prefix_parameter_count, prefix_size


def test_counts_match_the_loaded_demo_model(llama_base: BaseModel) -> None:
    config = llama_base.model.config
    assert base_parameter_count(config) == sum(p.numel() for p in llama_base.model.parameters())
    assert prefix_parameter_count(llama_base.geometry, 20) == 2 * 4 * 2 * 16 * 20


def test_an_8b_llama_prefix_is_a_tiny_fraction() -> None:
    """Llama-3-8B's published shape: 128 KiB per virtual token in bf16 (DESIGN.md), ~0.016% for 20 tokens."""
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    size = prefix_size(config, 20)
    assert size.base_parameters == 8_030_261_248
    assert size.prefix_parameters == 20 * 65_536 and size.bytes_bfloat16 == 20 * 128 * 1024
    assert 0.0001 < size.fraction < 0.0002
