"""The engine on the real SmolLM2-135M-Instruct (float32): PEFT's tokens in a mixed batch with the base
model, and the base model's real answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.engine.base_model import BaseModel, load_base_model
from server.engine.generation import generate
from testing.peft_reference import make_peft_adapter, peft_greedy_tokens
from tests.server.engine.helpers import request

pytestmark = pytest.mark.real_model

ADAPTERS = {"p5": (5, False, 1), "p10-projection": (10, True, 2)}  # name: (virtual tokens, projection, seed)
PROMPTS = ["The capital of France is", "Écris une phrase sur le café, puis une autre sur les crêpes :"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2(smollm2_model_dir: Path) -> BaseModel:
    return load_base_model(smollm2_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapters(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        name: make_peft_adapter(
            AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype="float32"),
            folder / name,
            num_virtual_tokens=tokens,
            prefix_projection=projection,
            seed=seed,
        )
        for name, (tokens, projection, seed) in ADAPTERS.items()
    }


def test_a_mixed_batch_matches_peft_token_for_token(
    smollm2: BaseModel, smollm2_model_dir: Path, adapters: dict[str, Path]
) -> None:
    """Both adapters and the bare model, on prompts of different lengths (one with multi-byte text), in
    one batch: each prefixed row equals PEFT's forward loop, the bare row equals the model alone."""
    rows = []
    for i, (name, adapter) in enumerate(adapters.items()):
        prefix, _ = load_prefix_source(adapter, smollm2.geometry, PrefixLimits())
        rows.append((adapter, request(smollm2, name, PROMPTS[i % 2], prefix, max_new_tokens=NEW_TOKENS)))
    bare = request(smollm2, "bare", PROMPTS[0], max_new_tokens=NEW_TOKENS)
    results = generate(smollm2, [r for _, r in rows] + [bare])
    reference = AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype="float32").eval()
    for (adapter, engine_request), result in zip(rows, results[:-1], strict=True):
        peft_model = PeftModel.from_pretrained(reference, adapter).eval()
        assert result.token_ids == peft_greedy_tokens(peft_model, list(engine_request.prompt_ids), NEW_TOKENS)
        reference = peft_model.get_base_model()  # prefix tuning leaves the base weights as they were
    assert results[-1].token_ids == generate(smollm2, [bare])[0].token_ids
    assert "Paris" in smollm2.tokenizer.decode(results[-1].token_ids)  # a real model, really answering
