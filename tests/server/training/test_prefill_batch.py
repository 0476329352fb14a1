"""The batch layout: a row's tokens never depend on its neighbours, and filter/concatenate keep rows intact."""

from __future__ import annotations

import torch

from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.sampling import SamplingParams
from server.training.prefill_batch import BatchRow, PrefillBatch
from tests.server.engine.helpers import random_prefix, request

PROMPTS = [
    "hello world",
    "Summarize the following text in one sentence: the weather today is sunny with a light breeze.",
    "a",
    "Translate the sentence into French.",
]


def _mixed_requests(base: BaseModel, sampling: SamplingParams | None = None):
    prefixes = [
        random_prefix(base, 3, seed=1),
        None,
        random_prefix(base, 17, seed=2),
        random_prefix(base, 3, seed=3),
    ]
    return [
        request(base, f"r{i}", prompt, prefix, max_new_tokens=8 + 3 * i, sampling=sampling)
        for i, (prompt, prefix) in enumerate(zip(PROMPTS, prefixes, strict=True))
    ]


def test_mixed_static_batch_equals_one_at_a_time(base: BaseModel) -> None:
    requests = _mixed_requests(base)
    together = generate(base, requests)
    alone = [generate(base, [r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [8, 11, 14, 17]
    # the rows really are different tasks: the same prompt under another prefix (or none) diverges
    assert len({tuple(r.token_ids[:8]) for r in together}) == 4


def test_seeded_sampling_equals_alone_in_a_batch(base: BaseModel) -> None:
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    requests = _mixed_requests(base, sampling)
    together = generate(base, requests)
    alone = [generate(base, [r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    greedy = generate(base, _mixed_requests(base))
    assert [r.token_ids for r in together] != [r.token_ids for r in greedy]


def test_padded_slots_are_zero_and_masked(llama_base: BaseModel) -> None:
    base = llama_base
    rows = [
        BatchRow("a", [5, 6, 7], random_prefix(base, 2, seed=0)),
        BatchRow("b", [5], None),
        BatchRow("c", [9, 9], random_prefix(base, 6, seed=1)),
    ]
    batch = PrefillBatch.from_rows(rows, base.geometry, base.device, base.dtype)
    assert batch.cache_length == 6
    assert batch.cache_mask.tolist() == [[False] * 4 + [True] * 2, [False] * 6, [True] * 6]
    for keys in batch.layer_keys:
        assert torch.all(keys.transpose(1, 2)[~batch.cache_mask] == 0)  # [B, S, H, D] by [B, S]
    assert batch.input_positions.tolist() == [[2, 3, 4], [0, 0, 0], [0, 6, 7]]
    mask = batch.attention_mask(torch.float32)  # [B, 1, Q, S + Q]
    assert mask.shape == (3, 1, 3, 9)
    allowed = mask[:, 0] == 0
    assert allowed[1, 2].tolist() == [False] * 8 + [True]  # row b's only token sees only itself
    assert allowed[0, 0].tolist() == [False] * 4 + [True] * 3 + [False] * 2
    assert allowed.any(dim=-1).all()  # no fully masked query row anywhere
