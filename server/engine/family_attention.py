"""BLOOM and Falcon, whose attention layers compute attention in their own code rather than through
transformers' attention interface, switched to ``paged_attention`` on the loaded instance.

Each attention module's forward is replaced (on the instance, never the class) by one that computes the
queries, keys and values exactly as the model's own code does, writes the keys and values through the
cache (``update``: the pool's slots), and in an engine pass attends with ``paged_attention``; any other
call (a soft prompt's pass, training on ``PrefillBatch``) is the model's own forward (BLOOM's alibi
tensor then read off a 4-D mask where it gets one). BLOOM's ALiBi goes to the paged path as per-head
slopes: the mask gets ``slope[h] × key position`` (the prefix at 0…P-1, the prompt after it, as PEFT's
mask makes BLOOM count), which is BLOOM's bias up to a constant per query. Newer transformers route
Falcon's attention through the interface itself (5.25), then only its variants are checked here.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomModel, _get_alibi_slopes
from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from server.engine.model_support import UnsupportedModel
from server.engine.paged_attention import in_engine_pass, paged_attention


def check_family_variant(config: Any) -> None:
    """``UnsupportedModel`` for a BLOOM or Falcon variant the engine cannot serve, whichever way its
    attention reaches ``paged_attention``."""
    if config.model_type == "bloom" and config.pretraining_tp > 1 and config.slow_but_exact:
        raise UnsupportedModel(
            "bloom with slow_but_exact splits its output projection, which is not rerouted"
        )
    if config.model_type != "falcon":
        return
    if config.alibi:
        raise UnsupportedModel(
            "falcon with alibi=True computes its ALiBi attention itself, outside the engine's paged attention"
        )
    if not config.new_decoder_architecture and config.multi_query:
        raise UnsupportedModel(
            "multi-query falcon caches one key/value head while a PEFT prefix (and the KV pool) holds one per "
            "query head"
        )


def route_own_attention(model: PreTrainedModel) -> bool:
    """Switch ``model``'s attention modules to ``paged_attention`` if it is a family whose attention code
    this module knows (True); False for any other."""
    config = model.config.get_text_config()
    if config.model_type == "bloom":
        _route_bloom(model)
    elif config.model_type == "falcon":
        _route_falcon(model)
    else:
        return False
    return True


def _route_bloom(model: PreTrainedModel) -> None:
    slopes = None
    for module in model.modules():
        if isinstance(module, BloomModel):
            # the engine's masks are 4-D (a placeholder in its passes, PrefillBatch's in training), and
            # BLOOM builds its alibi tensor from a 2-D one
            module.build_alibi_tensor = _alibi_of_any_mask
        elif isinstance(module, BloomAttention):
            if slopes is None:  # one tensor for every layer: the pass builds its ALiBi mask once
                slopes = _get_alibi_slopes(module.num_heads, module.query_key_value.weight.device)
            module.alibi_slopes = slopes
            module.forward = types.MethodType(_bloom_forward, module)


def _alibi_of_any_mask(mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's alibi tensor from a 2-D mask, or from a 4-D additive one: the keys its last query sees
    (inputs are left-padded, so the last query is real and sees every real key)."""
    if mask.ndim == 4:
        mask = (mask[:, 0, -1, :] == 0).long()
    return bloom_alibi(mask, num_heads, dtype)


def _bloom_forward(
    self: BloomAttention,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if not in_engine_pass():
        return type(self).forward(
            self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache, output_attentions
        )
    batch, queries, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, Q, D] each
    key, value = layer_past.update(key, value, self.layer_idx)
    attended, _ = paged_attention(
        self, query, key, value, None, scaling=self.inv_norm_factor, alibi_slopes=self.alibi_slopes
    )
    output = self.dense(attended.reshape(batch, queries, self.hidden_size))
    return residual + output, None  # dropout_add at inference


def _route_falcon(model: PreTrainedModel) -> None:
    for module in model.modules():
        if isinstance(module, FalconAttention):
            module.forward = types.MethodType(_falcon_forward, module)


def _falcon_forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not in_engine_pass():
        return type(self).forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids,
            layer_past,
            use_cache,
            output_attentions,
            position_embeddings,
        )
    # as FalconAttention.forward: the new architecture caches its kv heads broadcast to every query head
    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # [B, Q, heads, D]
    batch, queries = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(batch, self.num_heads, queries, self.head_dim)
    key = key.transpose(1, 2).reshape(batch, kv_heads, queries, self.head_dim)
    value = value.transpose(1, 2).reshape(batch, kv_heads, queries, self.head_dim)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key, value = layer_past.update(key, value, self.layer_idx)
    attended, _ = paged_attention(self, query, key, value, None, scaling=self.inv_norm_factor)
    return self.dense(attended.reshape(batch, queries, self.num_heads * self.head_dim)), None
