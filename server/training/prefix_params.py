"""The trainable prefix (``--method prefix``): per-layer key/value vectors, learned directly or through
the paper's MLP.

Both kinds produce a ``Prefix`` (keys, values ``[layers, kv_heads, P, head_dim]``) in the space the
model's cache stores, differentiably, on every forward; ``export`` folds either into plain tensors.

``DirectPrefix`` holds the keys and values as parameters (PEFT's ``prefix_projection=False``).
``ProjectedPrefix`` is Li & Liang's reparameterisation ``P = MLP(P')``: an embedding ``P'``
``[P, kv_heads * head_dim]``, ``Linear → tanh → Linear`` to ``layers * 2 * kv_heads * head_dim`` per
virtual token, laid out like a PEFT ``prompt_embeddings`` row (layer, key|value, head, head_dim), plus a
fixed ``anchor`` prefix. With a random initialisation the anchor is zero and the MLP starts as PyTorch
initialises it (as PEFT does); with ``--init-text`` the anchor is the text's K/V and the MLP's last layer
starts at zero, so training starts exactly from the real-word activations and learns a correction.

An encoder-decoder's decoder layers are tied as PEFT ties them: a ``SEQ_2_SEQ_LM`` prefix tensor feeds
decoder layer ``j`` its entry ``2j mod layers`` (``seq2seq_layer_sources``), so with an even layer count
two layers read one entry. Both kinds learn the entries and give each layer its entry's keys and values,
so what is trained is exactly what a PEFT adapter can hold (and ``encode_peft`` writes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prefix_store.formats.peft import seq2seq_layer_sources
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.training.data import Example
from server.training.forward import completion_loss
from server.training.trained_params import TrainedParams


class TrainablePrefix(TrainedParams):
    """A prefix whose parameters the optimiser updates; ``forward`` returns it, differentiably."""

    def forward(self) -> Prefix:
        raise NotImplementedError

    def completion_loss(self, base: BaseModel, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """Through the engine's prefix injection (``forward.completion_loss``)."""
        return completion_loss(base, self(), examples)

    @torch.no_grad()
    def export(self) -> Prefix:
        """The prefix as plain float32 CPU tensors, any reparameterisation folded away."""
        prefix = self()
        return Prefix(
            keys=prefix.keys.detach().float().cpu().contiguous(),
            values=prefix.values.detach().float().cpu().contiguous(),
        )


def layer_sources(geometry: ModelGeometry) -> list[int]:
    """The entry each layer reads: its own, except in an encoder-decoder's decoder, whose layers are tied as
    PEFT ties them (``seq2seq_layer_sources``)."""
    if geometry.encoder_decoder:
        return seq2seq_layer_sources(geometry.num_layers)
    return list(range(geometry.num_layers))


class DirectPrefix(TrainablePrefix):
    """Keys and values as parameters: exactly the numbers that will be served."""

    def __init__(self, geometry: ModelGeometry, initial: Prefix) -> None:
        super().__init__()
        if not initial.fits(geometry):
            raise ValueError(f"the initial prefix does not fit {geometry.fingerprint}")
        self.geometry = geometry
        self.num_virtual_tokens = initial.num_virtual_tokens
        sources = layer_sources(geometry)
        entries = sorted(set(sources))  # the entries some layer reads
        self.layer_entry = [entries.index(source) for source in sources]
        self.keys = nn.Parameter(initial.keys[entries].detach().float().clone())  # [entries, kv_heads, P, hd]
        self.values = nn.Parameter(initial.values[entries].detach().float().clone())

    def forward(self) -> Prefix:
        return Prefix(self.keys[self.layer_entry], self.values[self.layer_entry])  # [layers, kv_heads, P, hd]


class ProjectedPrefix(TrainablePrefix):
    """``anchor + MLP(embedding)``: the reparameterisation of the paper, for a more stable optimisation."""

    def __init__(
        self,
        geometry: ModelGeometry,
        num_virtual_tokens: int,
        hidden: int,
        *,
        seed: int,
        anchor: Prefix | None = None,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.num_virtual_tokens = num_virtual_tokens
        token_dim = geometry.num_kv_heads * geometry.head_dim
        out_dim = geometry.num_layers * 2 * token_dim
        # nn.Linear draws from the global RNG: draw under our seed without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, token_dim))  # [P, token_dim]
            self.mlp = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        shape = geometry.prefix_shape(num_virtual_tokens)
        if anchor is None:
            anchor = Prefix(torch.zeros(shape), torch.zeros(shape))
        else:
            if not anchor.fits(geometry) or anchor.num_virtual_tokens != num_virtual_tokens:
                raise ValueError(
                    f"the anchor prefix does not fit {geometry.fingerprint} with P={num_virtual_tokens}"
                )
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.register_buffer("anchor_keys", anchor.keys.detach().float().clone())  # [layers, kv_heads, P, hd]
        self.register_buffer("anchor_values", anchor.values.detach().float().clone())
        self.layer_source = layer_sources(geometry)

    def forward(self) -> Prefix:
        g = self.geometry
        rows = self.mlp(self.embedding).view(
            self.num_virtual_tokens, g.num_layers, 2, g.num_kv_heads, g.head_dim
        )[:, self.layer_source]  # [P, layers, key|value, kv_heads, head_dim]
        keys = rows[:, :, 0].permute(1, 2, 0, 3)  # [layers, kv_heads, P, head_dim]
        values = rows[:, :, 1].permute(1, 2, 0, 3)
        return Prefix(self.anchor_keys + keys, self.anchor_values + values)


def random_prefix(geometry: ModelGeometry, num_virtual_tokens: int, *, seed: int, std: float) -> Prefix:
    """Independent normal keys and values, ``N(0, std²)``, drawn from ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    shape = geometry.prefix_shape(num_virtual_tokens)
    return Prefix(
        torch.randn(shape, generator=generator) * std,
        torch.randn(shape, generator=generator) * std,
    )


def build_trainable_prefix(
    geometry: ModelGeometry,
    num_virtual_tokens: int,
    *,
    projection: bool,
    projection_hidden: int,
    seed: int,
    init_std: float,
    initial: Prefix | None = None,
) -> TrainablePrefix:
    """The trainable prefix of a new run: from ``initial`` (real-word activations) or random."""
    if projection:
        return ProjectedPrefix(geometry, num_virtual_tokens, projection_hidden, seed=seed, anchor=initial)
    if initial is None:
        initial = random_prefix(geometry, num_virtual_tokens, seed=seed, std=init_std)
    return DirectPrefix(geometry, initial)
