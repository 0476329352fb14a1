"""Greedy tokens from the engine equal PEFT's, token for token, in float32 (DESIGN.md "PEFT equivalence")."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from testing.peft_reference import make_peft_adapter, peft_greedy_tokens
from tests.server.engine.helpers import request

ADAPTERS = {  # name: (num_virtual_tokens, prefix_projection, seed)
    "p4": (4, False, 1),
    "p13": (13, False, 2),
    "p7-projection": (7, True, 3),
}
PROMPTS = ["hello", "Once upon a time there was a little model that wanted to learn many tasks."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters for ``base``, each made on a fresh copy of the base model."""
    folder = tmp_path_factory.mktemp("adapters")
    made = {}
    for name, (tokens, projection, seed) in ADAPTERS.items():
        model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32")
        made[name] = make_peft_adapter(
            model, folder / name, num_virtual_tokens=tokens, prefix_projection=projection, seed=seed
        )
    return made


def _peft_reference(base: BaseModel, adapter: Path, prompt_ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    return peft_greedy_tokens(peft_model, prompt_ids, NEW_TOKENS)


@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long"])
def test_engine_matches_peft_token_for_token(
    base: BaseModel, adapters: dict[str, Path], adapter_name: str, prompt: str
) -> None:
    prefix, _ = load_prefix_source(adapters[adapter_name], base.geometry, PrefixLimits())
    engine_request = request(base, "r", prompt, prefix, max_new_tokens=NEW_TOKENS)
    engine_tokens = generate(base, [engine_request])[0].token_ids
    assert engine_tokens == _peft_reference(base, adapters[adapter_name], list(engine_request.prompt_ids))


def test_each_adapter_changes_the_output(base: BaseModel, adapters: dict[str, Path]) -> None:
    prompt = PROMPTS[1]
    outputs = {"base": generate(base, [request(base, "r", prompt, max_new_tokens=NEW_TOKENS)])[0].token_ids}
    for name, adapter in adapters.items():
        prefix, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
        outputs[name] = generate(base, [request(base, "r", prompt, prefix, max_new_tokens=NEW_TOKENS)])[
            0
        ].token_ids
    assert len({tuple(tokens) for tokens in outputs.values()}) == len(outputs), outputs


def test_mixed_batch_of_peft_adapters_matches_peft(base: BaseModel, adapters: dict[str, Path]) -> None:
    """All adapters and the bare model in one batch, each row equal to its own PEFT reference."""
    rows = []
    for i, (name, adapter) in enumerate(adapters.items()):
        prefix, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
        rows.append((adapter, request(base, name, PROMPTS[i % 2], prefix, max_new_tokens=NEW_TOKENS)))
    bare = request(base, "bare", PROMPTS[1], max_new_tokens=NEW_TOKENS)
    results = generate(base, [r for _, r in rows] + [bare])
    for (adapter, engine_request), result in zip(rows, results, strict=False):
        assert result.token_ids == _peft_reference(base, adapter, list(engine_request.prompt_ids))
    assert results[-1].token_ids == generate(base, [bare])[0].token_ids
