"""Parameter counts: a prefix against its base model (the paper's "0.1% of the parameters" point).

A prefix of ``P`` virtual tokens holds ``2 (K, V) × layers × kv_heads × head_dim × P`` numbers, whatever
it was trained with. A base model's count comes from its config alone: the model is built on the
``meta`` device, so no weights are needed and no memory is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from prefix_store.geometry import ModelGeometry


def prefix_parameter_count(geometry: ModelGeometry, num_virtual_tokens: int) -> int:
    """Numbers in a served prefix: keys and values of every layer."""
    return 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * num_virtual_tokens


def base_parameter_count(config: Any) -> int:
    """Parameters of the causal LM ``config`` describes (counted on the meta device, tied weights once)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class PrefixSize:
    """A prefix's size next to its base model's."""

    prefix_parameters: int
    base_parameters: int
    bytes_bfloat16: int  # in the device cache at 2 bytes per number

    @property
    def fraction(self) -> float:
        return self.prefix_parameters / self.base_parameters


def prefix_size(config: Any, num_virtual_tokens: int, base_parameters: int | None = None) -> PrefixSize:
    geometry = ModelGeometry.from_config(config)
    count = prefix_parameter_count(geometry, num_virtual_tokens)
    return PrefixSize(
        prefix_parameters=count,
        base_parameters=base_parameters if base_parameters is not None else base_parameter_count(config),
        bytes_bfloat16=count * 2,
    )
