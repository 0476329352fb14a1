"""Soft prompts (PEFT PROMPT_TUNING and P_TUNING) in the engine: rows of soft-prompt tasks, of prefix tasks
and of no task in one batch, each equal to PEFT's forward loop token for token (float32), joined at any
step. The virtual tokens take positions 0…P-1 and the prompt follows, PEFT's convention for soft prompts,
on Llama (GQA, rotary), GPT-2 (absolute positions) and Qwen2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.scheduler import SchedulerConfig
from server.engine.soft_prompts import soft_prompt_prefix
from testing.peft_reference import make_peft_adapter, make_peft_soft_prompt, peft_greedy_tokens
from tests.server.engine.helpers import request
from tests.server.engine.test_core import _staggered

PROMPTS = ["hello", "Once upon a time there was a little model that wanted to learn many tasks."]
NEW_TOKENS = 10
TASKS = {  # name: (method, num_virtual_tokens, seed)
    "soft3": ("PROMPT_TUNING", 3, 1),
    "soft11": ("PROMPT_TUNING", 11, 2),
    "ptuning6": ("P_TUNING", 6, 3),
    "prefix5": ("PREFIX_TUNING", 5, 4),
    "prefix13": ("PREFIX_TUNING", 13, 5),
}


def _fresh_model(base: BaseModel) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()


@pytest.fixture(scope="module")
def adapters(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("soft-prompts")
    made = {}
    for name, (method, tokens, seed) in TASKS.items():
        if method == "PREFIX_TUNING":
            made[name] = make_peft_adapter(
                _fresh_model(base), folder / name, num_virtual_tokens=tokens, seed=seed
            )
        else:
            made[name] = make_peft_soft_prompt(
                _fresh_model(base), folder / name, num_virtual_tokens=tokens, method=method, seed=seed
            )
    return made


def _conditioning(base: BaseModel, adapter: Path):
    """What the server keeps resident for a task: a prefix, or a soft prompt's keys and values."""
    loaded, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
    return soft_prompt_prefix(base, loaded) if isinstance(loaded, SoftPrompt) else loaded


def _reference(base: BaseModel, adapter: Path | None, prompt_ids: list[int]) -> list[int]:
    if adapter is not None:
        return peft_greedy_tokens(
            PeftModel.from_pretrained(_fresh_model(base), adapter).eval(), prompt_ids, NEW_TOKENS
        )
    ids, model = torch.tensor([prompt_ids]), _fresh_model(base)
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def _cases(base: BaseModel, adapters: dict[str, Path]) -> list[tuple[Path | None, object]]:
    cases = []
    for name in [*TASKS, None]:
        adapter = adapters[name] if name else None
        prefix = _conditioning(base, adapter) if adapter else None
        for j, prompt in enumerate(PROMPTS):
            cases.append(
                (adapter, request(base, f"{name or 'base'}-{j}", prompt, prefix, max_new_tokens=NEW_TOKENS))
            )
    return cases


def test_soft_prompts_prefixes_and_base_rows_in_one_batch_equal_pefts_forward_loop(
    base: BaseModel, adapters: dict[str, Path]
) -> None:
    cases = _cases(base, adapters)
    results = generate(base, [engine_request for _, engine_request in cases])
    for (adapter, engine_request), result in zip(cases, results, strict=True):
        assert result.token_ids == _reference(base, adapter, list(engine_request.prompt_ids)), (
            engine_request.request_id
        )


def test_soft_prompt_rows_joining_at_different_steps_match_solo_runs(
    base: BaseModel, adapters: dict[str, Path]
) -> None:
    requests = [engine_request for _, engine_request in _cases(base, adapters)]
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    core = EngineCore(base, SchedulerConfig(max_batch_size=5, max_batch_tokens=4096))
    arrivals = [0, 0, 1, 2, 2, 3, 5, 5, 6, 8, 9, 9]
    assert _staggered(core, requests, arrivals=arrivals) == solo


def test_each_soft_prompt_changes_the_output(base: BaseModel, adapters: dict[str, Path]) -> None:
    outputs = {
        name: tuple(
            generate(base, [request(base, name, PROMPTS[1], _conditioning(base, adapters[name]))])[
                0
            ].token_ids
        )
        for name in TASKS
    }
    outputs["base"] = tuple(generate(base, [request(base, "base", PROMPTS[1])])[0].token_ids)
    assert len(set(outputs.values())) == len(outputs)
