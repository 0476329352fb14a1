"""Logprobs of generated and prompt tokens are PEFT's own log-softmax, in a mixed, chunked batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import collect_results
from server.engine.lifecycle import FinishReason
from server.engine.scheduler import SchedulerConfig
from testing.peft_reference import make_peft_adapter, peft_logprobs
from tests.server.engine.helpers import random_prefix, request

PROMPT = "Once upon a time there was a little model that wanted to learn many tasks, one prefix each."
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def peft_task(base: BaseModel, tmp_path_factory: pytest.TempPathFactory):
    """A PEFT prefix-tuning adapter (9 virtual tokens), as the engine's prefix and as PEFT's model."""
    model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32")
    adapter = make_peft_adapter(model, tmp_path_factory.mktemp("adapter") / "a", num_virtual_tokens=9, seed=4)
    prefix, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
    reference = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()
    return prefix, PeftModel.from_pretrained(reference, adapter).eval()


def _run(base: BaseModel, requests, chunk_tokens: int = 8):
    config = SchedulerConfig(max_batch_size=8, max_batch_tokens=8192, prefill_chunk_tokens=chunk_tokens)
    core = EngineCore(base, replace(config, prefill_step_tokens=2 * chunk_tokens))
    for r in requests:
        core.add_request(r)
    return collect_results(core, requests)


def test_logprobs_of_new_and_prompt_tokens_are_pefts(base: BaseModel, peft_task) -> None:
    """In a batch with a bare row and another task, prompt read in chunks of 8: every new token's logprob
    and top-5 alternatives, and every prompt token's logprob (the first: none), equal PEFT's forward."""
    prefix, peft_model = peft_task
    asked = replace(request(base, "asked", PROMPT, prefix, max_new_tokens=6), logprobs=5, prompt_logprobs=3)
    others = [
        request(base, "bare", "hello", max_new_tokens=6),
        request(base, "other", PROMPT, random_prefix(base, 4, 1)),
    ]
    result = _run(base, [asked, *others])[0]
    prompt = list(asked.prompt_ids)
    want = peft_logprobs(peft_model, prompt + result.token_ids)  # [T, V]
    assert len(result.logprobs) == len(result.token_ids) == 6
    for i, entry in enumerate(result.logprobs):
        row = want[len(prompt) + i - 1]
        assert entry.token_id == result.token_ids[i] == int(row.argmax())  # greedy
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=TOLERANCE)
        values, ids = row.topk(5)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=TOLERANCE)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for j, entry in enumerate(result.prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[j]
        assert entry.logprob == pytest.approx(float(want[j - 1, prompt[j]]), abs=TOLERANCE)
        assert [t for t, _ in entry.top] == want[j - 1].topk(3).indices.tolist()


def test_echo_without_new_tokens_scores_the_prompt_and_generates_nothing(base: BaseModel, peft_task) -> None:
    """``max_new_tokens`` 0 with prompt logprobs (lm-eval's loglikelihood): the prompt is scored, no token
    is generated, and rows beside it are unaffected."""
    prefix, peft_model = peft_task
    scored = replace(request(base, "scored", PROMPT, prefix, max_new_tokens=0), prompt_logprobs=0)
    beside = request(base, "beside", "hello", max_new_tokens=5)
    alone = _run(base, [beside])[0]
    results = _run(base, [scored, beside], chunk_tokens=16)
    assert results[0].token_ids == [] and results[0].finish_reason is FinishReason.LENGTH
    want = peft_logprobs(peft_model, list(scored.prompt_ids))
    got = torch.tensor([entry.logprob for entry in results[0].prompt_logprobs[1:]])
    expected = want[:-1].gather(1, torch.tensor(scored.prompt_ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert all(entry.top == () for entry in results[0].prompt_logprobs[1:])
    assert results[1].token_ids == alone.token_ids and results[1].logprobs is None


def test_out_of_range_requests_are_refused(llama_base: BaseModel) -> None:
    core = EngineCore(llama_base)
    for bad in ({"logprobs": 21}, {"prompt_logprobs": -1}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            core.add_request(replace(request(llama_base, "r", "hi"), **bad))
