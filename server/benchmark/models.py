"""Randomly initialised Llama-shaped models of named sizes, and random prefixes and soft prompts for them:
speed does not depend on the weights' values, so a benchmark needs no download."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.benchmark.settings import GEOMETRIES
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import BaseModel, lora_projections


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
        geometry=replace(ModelGeometry.from_config(config), projections=lora_projections(model)),
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


def random_soft_prompts(
    base: BaseModel, lengths: Sequence[int], *, seed: int, noise: float = 0.1
) -> list[SoftPrompt]:
    """One soft prompt per length, of the scale of real token embeddings: rows of the model's input
    embedding matrix drawn at random, plus Gaussian noise of ``noise`` times that matrix's standard
    deviation; float32 on the CPU, as a store holds one."""
    table = base.model.get_input_embeddings().weight.detach().float().cpu()  # [vocab, embedding_dim]
    scale = noise * float(table.std())
    generator = torch.Generator().manual_seed(seed)
    soft_prompts = []
    for length in lengths:
        rows = torch.randint(table.shape[0], (length,), generator=generator)
        jitter = torch.randn(length, table.shape[1], generator=generator) * scale
        soft_prompts.append(SoftPrompt(table[rows] + jitter))  # [P, embedding_dim]
    return soft_prompts
