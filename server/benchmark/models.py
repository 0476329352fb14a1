"""Randomly initialised Llama-shaped models of named sizes, and random prefixes for them: speed does
not depend on the weights' values, so a benchmark needs no download."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_store import ModelGeometry, Prefix
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import BaseModel


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that set a Llama model's cost."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


GEOMETRIES = {
    "tiny": LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, mlp=344),
    "small": LlamaShape(hidden=512, layers=8, heads=8, kv_heads=4, mlp=1376),  # ~25M parameters: the CPU run
    "llama-1b": LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192),
    "llama-8b": LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336),
}


def build_model(
    geometry: str = "small",
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> BaseModel:
    """A random Llama of a named geometry with the demo tokenizer, built directly on ``device`` in ``dtype``."""
    tokenizer = build_demo_tokenizer()
    shape = GEOMETRIES[geometry]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default_dtype)
    return BaseModel(
        model_id=f"bench-{geometry}",
        model=model,
        tokenizer=tokenizer,
        geometry=ModelGeometry.from_config(config),
        device=torch.device(device),
        dtype=dtype,
        max_positions=config.max_position_embeddings,
        eos_token_ids=frozenset(),
    )


def random_prefixes(base: BaseModel, lengths: Sequence[int], *, seed: int) -> list[Prefix]:
    """One prefix per length (standard-normal keys and values), on the model's device in its dtype."""
    generator = torch.Generator().manual_seed(seed)
    prefixes = []
    for length in lengths:
        shape = base.geometry.prefix_shape(length)  # [L, H, P, D]
        keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        prefixes.append(Prefix(keys, values).to(base.device, base.dtype))
    return prefixes


def random_tasks(base: BaseModel, lengths: Sequence[int], *, seed: int) -> dict[str, Prefix]:
    """``random_prefixes`` named ``task0``, ``task1``, ... in order."""
    prefixes = random_prefixes(base, lengths, seed=seed)
    return {f"task{i}": prefix for i, prefix in enumerate(prefixes)}
