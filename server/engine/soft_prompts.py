"""A soft prompt's keys and values: what its virtual tokens leave in every layer's cache.

A soft-prompt row's input is the task's P learned embeddings at positions 0…P-1, then its prompt from P
on (PEFT's ``PROMPT_TUNING`` and ``P_TUNING``). Under causal attention the virtual tokens attend only to
each other, so the keys and values they produce are the same for every row of the task, whatever its
prompt: one forward pass over the embeddings alone gives them, as a ``Prefix`` whose prompt tokens then
take positions P + k, which is the engine's convention for a prefix row too. So a soft-prompt task is
served exactly as a prefix task (one copy of its blocks in the KV pool for all its rows, mixed in any
batch), and its cost is that one pass when the task is loaded, not P extra prompt tokens per request.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel


def soft_prompt_prefix(base: BaseModel, soft_prompt: SoftPrompt) -> Prefix:
    """The keys and values of ``soft_prompt``'s virtual tokens in every layer (the model's own attention:
    this runs outside the engine's passes, on a loader thread), as a CPU prefix in the model's dtype."""
    num_virtual_tokens = soft_prompt.num_virtual_tokens
    embeddings = soft_prompt.embeddings.to(base.device, base.dtype).unsqueeze(0)  # [1, P, embedding_dim]
    positions = torch.arange(num_virtual_tokens, device=base.device).unsqueeze(0)  # [1, P]
    cache = DynamicCache()  # full layers: a local layer's window is the mask's business, as in the engine
    with torch.no_grad():
        base.model(
            inputs_embeds=embeddings, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, P, head_dim]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return Prefix(keys.cpu(), values.cpu())
