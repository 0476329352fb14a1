"""Penalties, logit bias and min_tokens: per row, as OpenAI and vLLM define them, and nothing for the rest."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.lifecycle import FinishReason
from server.engine.logits_processing import RowHistory, process_logits
from server.engine.sampling import SamplingParams
from tests.server.engine.helpers import request

PLAIN = SamplingParams()


def test_rows_that_ask_for_nothing_are_untouched() -> None:
    logits = torch.randn(3, 10)
    histories = [RowHistory([1, 2], [3])] * 3
    assert process_logits(logits, [PLAIN] * 3, histories) is logits


def test_each_row_gets_its_own_penalties_bias_and_bans() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]] * 4)
    params = [
        replace(PLAIN, repetition_penalty=2.0),
        replace(PLAIN, presence_penalty=0.5, frequency_penalty=0.25),
        replace(PLAIN, logit_bias=((4, 3.0), (0, -1.0))),
        PLAIN,
    ]
    histories = [
        RowHistory([0], [1]),  # seen: 0 (positive: halved) and 1 (negative: doubled)
        RowHistory([4], [2, 2, 3]),  # generated: 2 twice, 3 once (the prompt does not count)
        RowHistory([], []),
        RowHistory([], [], banned_ids=frozenset({0, 3})),
    ]
    out = process_logits(logits, params, histories)
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5, 0.0]
    assert out[1].tolist() == pytest.approx([2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.25 - 0.5, 0.0])
    assert out[2].tolist() == [1.0, -2.0, 1.0, 0.5, 3.0]
    assert out[3].tolist() == [float("-inf"), -2.0, 1.0, float("-inf"), 0.0]
    assert logits[0].tolist() == [2.0, -2.0, 1.0, 0.5, 0.0]  # the input is not modified


def test_min_tokens_holds_back_eos_and_stop_tokens(llama_base: BaseModel) -> None:
    base = llama_base
    (eos,) = sorted(base.eos_token_ids)[:1]
    forced_eos = replace(PLAIN, logit_bias=((eos, 100.0),))
    ends_now = replace(request(base, "r", "hello", max_new_tokens=10, sampling=forced_eos), ignore_eos=False)
    assert generate(base, [ends_now])[0].token_ids == [eos]
    held = replace(ends_now, min_tokens=4)
    result = generate(base, [held])[0]
    assert len(result.token_ids) == 5 and result.token_ids[-1] == eos and eos not in result.token_ids[:4]
    assert result.finish_reason is FinishReason.EOS


def test_a_stop_token_ends_the_row_with_stop(llama_base: BaseModel) -> None:
    base = llama_base
    free = generate(base, [request(base, "free", "hello world", max_new_tokens=8)])[0].token_ids
    stopping = replace(request(base, "r", "hello world", max_new_tokens=8), stop_token_ids=(free[2],))
    result = generate(base, [stopping])[0]
    assert result.token_ids == free[: free.index(free[2]) + 1] and result.finish_reason is FinishReason.STOP


def test_a_penalised_row_changes_nothing_for_its_neighbours(base: BaseModel) -> None:
    plain = request(base, "plain", "hello world", max_new_tokens=12)
    penalised = request(
        base,
        "penalised",
        "hello world",
        max_new_tokens=12,
        sampling=replace(PLAIN, repetition_penalty=3.0, frequency_penalty=1.0),
    )
    together = generate(base, [plain, penalised])
    assert together[0].token_ids == generate(base, [plain])[0].token_ids
    assert together[1].token_ids != together[0].token_ids  # the penalty did something


def test_out_of_vocabulary_ids_and_bad_min_tokens_are_refused(llama_base: BaseModel) -> None:
    core = EngineCore(llama_base)
    vocab = llama_base.model.config.vocab_size
    for bad in (
        {"stop_token_ids": (vocab,)},
        {"sampling": replace(PLAIN, logit_bias=((-1, 1.0),))},
        {"min_tokens": 11},
    ):
        with pytest.raises(ValueError):
            core.add_request(replace(request(llama_base, "r", "hi", max_new_tokens=10), **bad))
