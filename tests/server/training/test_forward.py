"""The training forward pass is the engine's: same logits, same greedy tokens, for the same prefix or
soft prompt."""

from __future__ import annotations

import torch

from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.runner import ModelRunner
from server.engine.soft_prompts import soft_prompt_prefix
from server.training.data import Example
from server.training.forward import IGNORE, completion_logits, soft_prompt_completion_logits
from server.training.prefill_batch import BatchRow, PrefillBatch
from tests.server.engine.helpers import random_prefix, request

PROMPTS = ["hello world", "Summarize the following text in one sentence: the weather today is sunny."]


def test_teacher_forced_logits_equal_the_engine_greedy_run(base: BaseModel) -> None:
    """Teacher-forcing the engine's own greedy continuation reproduces it token for token, and the logits
    of the first completion token equal the engine's prefill logits (mixed prompt lengths in one batch)."""
    prefix = random_prefix(base, 5, seed=3)
    examples, prefill = [], []
    for i, prompt in enumerate(PROMPTS):
        engine_request = request(base, f"r{i}", prompt, prefix, max_new_tokens=8)
        tokens = generate(base, [engine_request])[0].token_ids
        examples.append(
            Example(line=i + 1, prompt_ids=tuple(engine_request.prompt_ids), completion_ids=tuple(tokens))
        )
        batch = PrefillBatch.from_rows(
            [BatchRow("r", engine_request.prompt_ids, prefix)], base.geometry, base.device, base.dtype
        )
        prefill.append(ModelRunner(base).forward(batch)[0])  # [V]
    logits, targets = completion_logits(base, prefix, examples)  # [B, C, V], [B, C]
    assert logits.shape[:2] == targets.shape == (2, 8)
    assert torch.equal(logits.argmax(-1), targets)
    for row in range(2):
        torch.testing.assert_close(logits[row, 0], prefill[row], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_prefix_and_targets_cover_completions_only(llama_base: BaseModel) -> None:
    base = llama_base
    prefix = random_prefix(base, 3, seed=0)
    keys, values = prefix.keys.clone().requires_grad_(True), prefix.values.clone().requires_grad_(True)
    examples = [Example(1, (5, 6, 7, 8), (9, 10)), Example(2, (5,), (11, 12, 13))]
    logits, targets = completion_logits(base, Prefix(keys, values), examples)
    assert targets.tolist() == [[IGNORE, 9, 10], [11, 12, 13]]
    logits[targets != IGNORE].sum().backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.model.parameters())


def _random_soft_prompt(base: BaseModel, num_virtual_tokens: int, seed: int) -> SoftPrompt:
    generator = torch.Generator().manual_seed(seed)
    return SoftPrompt(torch.randn(num_virtual_tokens, base.geometry.embedding_dim, generator=generator))


def test_soft_prompt_teacher_forced_logits_equal_the_engine_greedy_run(base: BaseModel) -> None:
    """Teacher-forcing the tokens the engine generates after the soft prompt (served as the prefix its
    virtual tokens leave) reproduces them, rows of two prompt lengths in one batch."""
    soft_prompt = _random_soft_prompt(base, 5, seed=3)
    prefix = soft_prompt_prefix(base, soft_prompt)
    examples = []
    for i, prompt in enumerate(PROMPTS):
        engine_request = request(base, f"r{i}", prompt, prefix, max_new_tokens=8)
        tokens = generate(base, [engine_request])[0].token_ids
        examples.append(
            Example(line=i + 1, prompt_ids=tuple(engine_request.prompt_ids), completion_ids=tuple(tokens))
        )
    logits, targets = soft_prompt_completion_logits(base, soft_prompt, examples)  # [B, C, V], [B, C]
    assert logits.shape[:2] == targets.shape == (2, 8)
    assert torch.equal(logits.argmax(-1), targets)
    alone = soft_prompt_completion_logits(base, soft_prompt, examples[:1])[0]  # no padding in its row
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_soft_prompt_alone(llama_base: BaseModel) -> None:
    embeddings = _random_soft_prompt(llama_base, 3, seed=0).embeddings.requires_grad_(True)
    examples = [Example(1, (5, 6, 7, 8), (9, 10)), Example(2, (5,), (11, 12, 13))]
    logits, targets = soft_prompt_completion_logits(llama_base, SoftPrompt(embeddings), examples)
    assert targets.tolist() == [[IGNORE, 9, 10], [11, 12, 13]]
    logits[targets != IGNORE].sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum(dim=1).min() > 0  # every virtual token
    assert all(p.grad is None for p in llama_base.model.parameters())
