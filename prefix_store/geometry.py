"""The attention-cache geometry of a base model, which every prefix must match."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Projection:
    """A linear map inside the base model's layers that a LoRA task may adapt."""

    name: str  # its module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    transposed: bool = False  # GPT-2's Conv1D keeps its weight [in, out] (PEFT's ``fan_in_fan_out``)


@dataclass(frozen=True)
class ModelGeometry:
    """Shape of one layer's key/value cache entry, for every attention layer of a causal LM."""

    model_type: str  # e.g. "llama", "gpt2"
    num_layers: int  # attention layers, each of which gets its own prefix K/V
    num_kv_heads: int  # key/value heads (fewer than query heads under grouped-query attention)
    head_dim: int  # features per head
    embedding_dim: int | None = None  # width of the input embeddings (a soft prompt's); not fingerprinted
    # T5, BART: the layers, heads and widths above are the decoder's (a prefix goes into its self-attention)
    encoder_decoder: bool = False
    # the projections a LoRA task may adapt (the loaded model's; none: LoRA tasks are not served)
    projections: tuple[Projection, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_config(cls, config: Any) -> ModelGeometry:
        """Derive the geometry from a Hugging Face model config (Llama/Mistral/Qwen2-style or GPT-2); the
        embedding width is the hidden size (``load_base_model`` takes the model's own where they differ)."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "is_encoder_decoder", False):  # BART's names, else T5's
            heads = getattr(text_config, "decoder_attention_heads", None) or text_config.num_heads
            return cls(
                model_type=str(text_config.model_type),
                num_layers=int(
                    getattr(text_config, "decoder_layers", None) or text_config.num_decoder_layers
                ),
                num_kv_heads=int(heads),
                head_dim=int(getattr(text_config, "d_kv", None) or text_config.d_model // heads),
                embedding_dim=int(text_config.d_model),
                encoder_decoder=True,
            )
        num_heads = text_config.num_attention_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        return cls(
            model_type=str(text_config.model_type),
            num_layers=int(text_config.num_hidden_layers),
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            embedding_dim=int(text_config.hidden_size),
        )

    @cached_property
    def projection_by_name(self) -> Mapping[str, Projection]:
        """``projections`` by module path."""
        return {projection.name: projection for projection in self.projections}

    @property
    def fingerprint(self) -> str:
        """A short string naming the architecture; stored in every native prefix and checked on upload."""
        return f"{self.model_type}/layers={self.num_layers}/kv_heads={self.num_kv_heads}/head_dim={self.head_dim}"

    def prefix_shape(self, num_virtual_tokens: int) -> tuple[int, int, int, int]:
        """Shape of a native ``keys`` or ``values`` tensor: ``[layers, kv_heads, P, head_dim]``."""
        return (self.num_layers, self.num_kv_heads, num_virtual_tokens, self.head_dim)

    def bytes_per_virtual_token(self, element_size: int) -> int:
        """Bytes one virtual token costs in the device cache (keys and values of every layer)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size
