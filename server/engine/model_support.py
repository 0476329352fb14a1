"""Which base models the engine can serve: a start-up check of the attention layout, with a one-line reason
for a model it cannot (refused when the server starts, never a failure per request).

The engine keeps every layer's keys and values in its paged KV pool and attends over them itself
(``paged_attention``), so a model must (1) have attention layers of the kinds it masks (global, or local
with a sliding window), each keeping keys and values of one head width, and (2) route them through
transformers' attention interface. What falls outside: state-space, linear-attention and hybrid layers
(Mamba, Jamba, Zamba, Falcon-H1…: a recurrent state, not a key/value cache), chunked or sparse attention,
multi-head latent attention (DeepSeek V2/V3: keys and values of different widths), and models that compute
attention themselves (ALiBi in MPT) unless ``family_attention`` reroutes them (BLOOM, Falcon).
"""

from __future__ import annotations

from transformers import PretrainedConfig

SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "sparse", "dense"})  # MLP kinds too


class UnsupportedModel(ValueError):
    """The base model's attention is of a kind the engine cannot serve (the message says which)."""


def check_attention_layout(config: PretrainedConfig) -> None:
    """Raise ``UnsupportedModel`` unless ``config``'s (text) model keeps a key/value cache the KV pool
    holds. Whether its layers go through the attention interface is checked when the engine switches
    them (``use_paged_attention``)."""
    config = config.get_text_config()
    kind = config.model_type
    other = sorted(set(getattr(config, "layer_types", None) or ()) - SERVED_LAYER_TYPES)
    if other:
        raise UnsupportedModel(
            f"{kind} has {other[0]} layers, which keep no key/value cache of the kind the engine pages "
            "(it serves global and sliding-window attention)"
        )
    if getattr(config, "kv_lora_rank", None):
        raise UnsupportedModel(
            f"{kind} uses multi-head latent attention (kv_lora_rank), whose keys and values differ in width, "
            "so the engine's KV pool cannot hold them"
        )
    if getattr(config, "num_attention_heads", None) is None:
        raise UnsupportedModel(f"{kind} has no attention heads (a state-space model?): nothing to page")
