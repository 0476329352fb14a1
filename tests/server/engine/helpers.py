"""Small builders shared by the engine tests."""

from __future__ import annotations

import torch

from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams


def random_prefix(base: BaseModel, num_virtual_tokens: int, seed: int) -> Prefix:
    generator = torch.Generator().manual_seed(seed)
    shape = base.geometry.prefix_shape(num_virtual_tokens)
    return Prefix(
        torch.randn(shape, generator=generator, dtype=base.dtype),
        torch.randn(shape, generator=generator, dtype=base.dtype),
    )


def request(
    base: BaseModel,
    request_id: str,
    prompt: str,
    prefix: Prefix | None = None,
    *,
    max_new_tokens: int = 10,
    sampling: SamplingParams | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = True,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=base.tokenizer(prompt).input_ids,
        prefix=prefix,
        sampling=sampling or SamplingParams(),
        max_new_tokens=max_new_tokens,
        stop_sequences=stop,
        ignore_eos=ignore_eos,
    )
