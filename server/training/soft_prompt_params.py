"""The trainable soft prompt (``--method prompt-tuning``, Lester et al., 2021): ``P`` input embeddings put
before every prompt, the frozen model run on them as PEFT's ``PROMPT_TUNING`` runs it.

Initialised from real tokens' embeddings, as PEFT's ``prompt_tuning_init`` does: ``--init-text``'s tokens
(repeated or cut to ``P``: PEFT's ``TEXT``), else ``P`` tokens drawn uniformly from the vocabulary under
the seed (PEFT's ``SAMPLE_VOCAB``). Either way the soft prompt starts at the scale and in the space of
the model's own inputs, where a normal draw (PEFT's ``RANDOM``) starts far from both on a trained model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prefix_store.geometry import ModelGeometry
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from server.training.data import Example
from server.training.forward import soft_prompt_completion_loss
from server.training.trained_params import TrainedParams


class TrainableSoftPrompt(TrainedParams):
    """The soft prompt's embeddings as the one parameter: exactly the numbers that will be exported."""

    def __init__(self, geometry: ModelGeometry, initial: SoftPrompt) -> None:
        super().__init__()
        if not initial.fits(geometry):
            raise ValueError(
                f"the initial soft prompt of shape {list(initial.embeddings.shape)} does not fit the base "
                f"model's embeddings of width {geometry.embedding_dim}"
            )
        self.geometry = geometry
        self.num_virtual_tokens = initial.num_virtual_tokens
        self.embeddings = nn.Parameter(initial.embeddings.detach().float().clone())  # [P, embedding_dim]

    def forward(self) -> SoftPrompt:
        return SoftPrompt(self.embeddings)

    def completion_loss(self, base: BaseModel, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """On ``inputs_embeds = cat(soft prompt, embed(tokens))`` (``forward.soft_prompt_completion_loss``)."""
        return soft_prompt_completion_loss(base, self(), examples)

    @torch.no_grad()
    def export(self) -> SoftPrompt:
        return SoftPrompt(self.embeddings.detach().float().cpu().clone())


def sampled_vocab_token_ids(vocab_size: int, num_virtual_tokens: int, *, seed: int) -> list[int]:
    """``num_virtual_tokens`` token ids drawn uniformly from ``0 … vocab_size-1`` by ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_virtual_tokens,), generator=generator).tolist()


def soft_prompt_from_tokens(base: BaseModel, token_ids: Sequence[int]) -> SoftPrompt:
    """The frozen model's input embeddings of ``token_ids`` ``[P, embedding_dim]``, as float32 CPU tensors."""
    with torch.no_grad():
        embeddings = base.model.get_input_embeddings()(torch.tensor(list(token_ids), device=base.device))
    return SoftPrompt(embeddings.float().cpu().clone())


def build_trainable_soft_prompt(
    base: BaseModel, num_virtual_tokens: int, *, seed: int, init_token_ids: Sequence[int] | None = None
) -> TrainableSoftPrompt:
    """The trainable soft prompt of a new run: the embeddings of ``init_token_ids`` (``--init-text``'s,
    already repeated or cut to ``num_virtual_tokens``), else of tokens sampled from the vocabulary."""
    if init_token_ids is None:
        # the tokenizer's ids only: an embedding table may have rows past them, padding never trained
        vocab_size = min(len(base.tokenizer), base.model.get_input_embeddings().num_embeddings)
        init_token_ids = sampled_vocab_token_ids(vocab_size, num_virtual_tokens, seed=seed)
    if len(init_token_ids) != num_virtual_tokens:
        raise ValueError(f"{len(init_token_ids)} initial tokens for {num_virtual_tokens} virtual tokens")
    return TrainableSoftPrompt(base.geometry, soft_prompt_from_tokens(base, init_token_ids))
