"""Encoder-decoder models (T5/mT5 with relative position bias, BART/mBART with learned positions,
Pegasus/Marian with sinusoidal ones): how the engine runs them, in one place.

A request's prompt is the encoder's source; the decoder starts from the model's decoder start token. At
admission the row's source goes through the encoder once (``encode``), and each decoder layer's
cross-attention keys and values of it are written into blocks of the row's own in the KV pool, kept for
the row's life. The decoder then runs as a decoder-only model does: its self-attention over the paged
cache (a task's prefix first, PEFT's ``SEQ_2_SEQ_LM`` semantics: the prefix goes into the decoder's
self-attention only), its cross-attention over the row's source blocks (``prepare`` marks each layer's
role with ``set_role``), so rows of any prefix and any source length share one packed pass.

Two things the model would compute from a dense batch are computed per row instead: the decoder's
positions (a prefix of P tokens puts the first decoder token at position P, as PEFT's cache does; BART's
learned or sinusoidal embedding reads ``PagedAttention.positions``) and T5's relative position bias (``relative_bias``:
from each query's and key's cache position, the prefix at 0…P-1).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from server.engine.model_kind import ModelInputs
from server.engine.model_support import UnsupportedModel
from server.engine.paged_attention import AttentionRole, current_pass, reading_pool, set_role

SERVED_FAMILIES = ("t5", "mt5", "bart", "mbart", "pegasus", "marian")


def check_encoder_decoder(config: object) -> None:
    """``UnsupportedModel`` (one line) for an encoder-decoder family the engine does not serve."""
    kind = getattr(config, "model_type", "?")
    if kind not in SERVED_FAMILIES:
        raise UnsupportedModel(
            f"{kind} is an encoder-decoder model of a family the engine does not serve "
            f"(it serves {', '.join(SERVED_FAMILIES)})"
        )


def decoder_attentions(model: PreTrainedModel) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Each decoder layer's (self-attention, cross-attention) modules."""
    decoder = model.get_decoder()
    if hasattr(decoder, "block"):  # T5
        return [(block.layer[0].SelfAttention, block.layer[1].EncDecAttention) for block in decoder.block]
    return [(layer.self_attn, layer.encoder_attn) for layer in decoder.layers]


def _t5_bias(layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """T5's decoder self-attention bias (its first layer's table, shared by every layer) of ``relative``
    ``[b, 1, Q, S]`` cache positions key - query → ``[b, heads, Q, S]``."""

    def bias(relative: torch.Tensor) -> torch.Tensor:
        buckets = layer._relative_position_bucket(
            relative[:, 0],
            bidirectional=False,
            num_buckets=layer.relative_attention_num_buckets,
            max_distance=layer.relative_attention_max_distance,
        )  # [b, Q, S]
        return layer.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [b, heads, Q, S]

    return bias


def _paged_positions(self: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    """A learned or sinusoidal decoder position embedding's forward: in an engine pass, at the pass's own
    position ids (``[1, N]`` → ``[1, N, d]``); otherwise the model's own."""
    paged = current_pass()
    if paged is None or paged.positions is None:
        return type(self).forward(self, *args, **kwargs)
    return F.embedding(paged.positions + getattr(self, "offset", 0), self.weight)


@dataclass(frozen=True)
class EncoderDecoder:
    """An encoder-decoder base model as the engine runs it (a ``ModelKind``; ``prepare`` switches its
    layers)."""

    model: PreTrainedModel
    decoder_start_ids: tuple[int, ...]  # what every row's decoder is fed first
    cross_attentions: tuple[torch.nn.Module, ...]  # each decoder layer's, in order
    extra_blocks_per_row: int = 2  # the source's last, partly filled block and the decoder start's

    @classmethod
    def prepare(cls, model: PreTrainedModel) -> EncoderDecoder:
        """Mark ``model``'s decoder attention layers with their roles and reroute its decoder positions
        (on the instance). Raises ``UnsupportedModel`` for a family it does not serve."""
        check_encoder_decoder(model.config)
        pairs = decoder_attentions(model)
        bias = _t5_bias(pairs[0][0]) if getattr(pairs[0][0], "has_relative_attention_bias", False) else None
        for self_attention, cross_attention in pairs:
            set_role(self_attention, AttentionRole(cross=False, relative_bias=bias))
            set_role(cross_attention, AttentionRole(cross=True))
        positions = getattr(model.get_decoder(), "embed_positions", None)
        if positions is not None:
            positions.forward = types.MethodType(_paged_positions, positions)
        start = model.config.decoder_start_token_id
        if start is None:
            raise UnsupportedModel(f"{model.config.model_type} has no decoder_start_token_id")
        return cls(model, (int(start),), tuple(cross for _, cross in pairs))

    @torch.inference_mode()
    def encode(self, source_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of ``source_ids`` for every decoder layer, each
        ``[layers, heads, S, head_dim]``: one encoder pass, then each layer's key and value projections."""
        device = self.model.device
        with reading_pool(None):
            hidden = self.model.get_encoder()(input_ids=torch.tensor([list(source_ids)], device=device))[0]
        keys, values = [], []
        for cross in self.cross_attentions:  # BART's names, else T5's
            project_keys = getattr(cross, "k_proj", None) or cross.k
            project_values = getattr(cross, "v_proj", None) or cross.v
            shape = (hidden.shape[1], getattr(cross, "num_heads", None) or cross.n_heads, -1)
            keys.append(project_keys(hidden[0]).view(shape).transpose(0, 1))  # [heads, S, head_dim]
            values.append(project_values(hidden[0]).view(shape).transpose(0, 1))
        return torch.stack(keys), torch.stack(values)

    def decoder_prompt(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        return self.decoder_start_ids

    def source(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompt_ids)

    def logits(self, batch: ModelInputs, *, every_position: bool) -> torch.Tensor:
        """The decoder's logits for a packed engine pass (inside ``reading_pool``): the encoder is skipped
        (its keys and values are in the pool) and the cross-attention caches are placeholders marked as
        filled, so no layer projects a source again."""
        width = self.model.config.d_model
        placeholder = batch.input_ids.new_zeros((), dtype=self.model.dtype).expand(1, 1, width)  # no memory
        layers = len(self.cross_attentions)
        filled = Cache(layers=[_Filled(batch.input_ids.device) for _ in range(layers)])
        caches = EncoderDecoderCache(batch.cache, filled)
        caches.is_updated = dict.fromkeys(range(layers), True)
        output = self.model(
            decoder_input_ids=batch.input_ids,
            encoder_outputs=(placeholder,),
            cache=caches,
            use_cache=True,
            **{f"decoder_{name}": value for name, value in batch.model_kwargs(self.model.dtype).items()},
        )
        logits = output.logits  # [1, N, V]: every input's (these models keep them all)
        return logits.float() if every_position else logits[0].index_select(0, batch.last_inputs).float()


class _Filled(CacheLayerMixin):
    """A cross-attention cache layer that says it is filled: the layer attends over the pool instead."""

    is_compileable = False
    is_sliding = False

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.keys = self.values = torch.zeros(1, 1, 0, 1, device=device)
        self.is_initialized = True
        self.device = device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a placeholder is never written")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise AssertionError("a placeholder is never written")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return 0, 0

    def get_seq_length(self) -> int:
        return 1

    def get_max_length(self) -> int:
        return -1
