"""LoRA tasks in the engine: rows of LoRA tasks (different ranks, targets, rsLoRA, rank and alpha patterns),
of prefix and soft-prompt tasks and of no task in one packed batch, each equal to PEFT's unmerged LoRA
forward loop token for token (float32), joined at any step; on Llama (GQA, every projection), GPT-2
(``Conv1D``) and Qwen2. The PEFT → native → PEFT round trip keeps the tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import write_peft_folder
from prefix_store.formats.source import load_prefix_source
from prefix_store.lora import LoraAdapter, LoraModule
from prefix_store.soft_prompt import SoftPrompt
from server.engine import lora_rows
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.lora_rows import LoraRows
from server.engine.request import GenerationRequest
from server.engine.scheduler import SchedulerConfig
from server.engine.soft_prompts import soft_prompt_prefix
from testing.peft_reference import (
    make_peft_adapter,
    make_peft_lora,
    make_peft_soft_prompt,
    peft_greedy_tokens,
)
from tests.server.engine.helpers import request
from tests.server.engine.test_core import _staggered

PROMPTS = ["hello", "Once upon a time there was a little model that wanted to learn many tasks."]
NEW_TOKENS = 8
ATTENTION = {"gpt2": ["c_attn", "attn.c_proj"], "default": ["q_proj", "k_proj", "v_proj", "o_proj"]}
EVERY = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
MLP_DOWN = {"gpt2": "mlp.c_proj", "default": "down_proj"}


def _of(table: dict[str, object], base: BaseModel) -> object:
    return table.get(base.geometry.model_type, table["default"])


def _lora_tasks(base: BaseModel) -> dict[str, dict[str, object]]:
    """LoRA tasks by name: ``make_peft_lora``'s options."""
    attention, every, down = _of(ATTENTION, base), _of(EVERY, base), _of(MLP_DOWN, base)
    return {
        "lora-attn-r8": {"target_modules": attention, "r": 8, "seed": 11},
        "lora-every-r4": {"target_modules": every, "r": 4, "lora_alpha": 8, "seed": 12},
        "lora-rslora-r16": {"target_modules": attention[:2], "r": 16, "use_rslora": True, "seed": 13},
        "lora-patterns": {
            "target_modules": every,
            "r": 6,
            "rank_pattern": {down: 2, f"{_first_attention(base)}.{attention[0]}": 12},
            "alpha_pattern": {attention[-1]: 40},
            "seed": 14,
        },
    }


def _first_attention(base: BaseModel) -> str:
    return "h.0.attn" if base.geometry.model_type == "gpt2" else "layers.0.self_attn"


def _fresh_model(base: BaseModel) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()


@pytest.fixture(scope="module")
def adapters(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp(f"lora-{base.geometry.model_type}")
    made = {
        name: make_peft_lora(_fresh_model(base), folder / name, **options)
        for name, options in _lora_tasks(base).items()
    }
    made["prefix5"] = make_peft_adapter(_fresh_model(base), folder / "prefix5", num_virtual_tokens=5, seed=4)
    made["soft3"] = make_peft_soft_prompt(_fresh_model(base), folder / "soft3", num_virtual_tokens=3, seed=5)
    return made


def _loaded(base: BaseModel, adapter: Path) -> dict[str, object]:
    """What a request of the task carries in process: ``prefix=`` or ``lora=``."""
    loaded, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
    if isinstance(loaded, LoraAdapter):
        return {"lora": loaded.to(base.device, base.dtype)}
    if isinstance(loaded, SoftPrompt):
        return {"prefix": soft_prompt_prefix(base, loaded)}
    return {"prefix": loaded}


def _request(
    base: BaseModel, request_id: str, prompt: str, conditioning: dict[str, object]
) -> GenerationRequest:
    plain = request(base, request_id, prompt, conditioning.get("prefix"), max_new_tokens=NEW_TOKENS)  # type: ignore[arg-type]
    return GenerationRequest(**{**plain.__dict__, "lora": conditioning.get("lora")})


def _reference(base: BaseModel, adapter: Path | None, prompt_ids: list[int]) -> list[int]:
    model = _fresh_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return peft_greedy_tokens(model, prompt_ids, NEW_TOKENS) if adapter else _greedy(model, prompt_ids)


def _greedy(model: torch.nn.Module, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def _cases(base: BaseModel, adapters: dict[str, Path]) -> list[tuple[Path | None, GenerationRequest]]:
    cases = []
    for name in [*adapters, None]:
        adapter = adapters[name] if name else None
        conditioning = _loaded(base, adapter) if adapter else {}
        for j, prompt in enumerate(PROMPTS):
            cases.append((adapter, _request(base, f"{name or 'base'}-{j}", prompt, conditioning)))
    return cases


def test_lora_prefix_soft_prompt_and_base_rows_in_one_batch_equal_pefts_forward_loop(
    base: BaseModel, adapters: dict[str, Path]
) -> None:
    cases = _cases(base, adapters)
    results = generate(base, [engine_request for _, engine_request in cases])
    for (adapter, engine_request), result in zip(cases, results, strict=True):
        assert result.token_ids == _reference(base, adapter, list(engine_request.prompt_ids)), (
            engine_request.request_id
        )


def test_lora_rows_joining_at_different_steps_match_solo_runs(
    base: BaseModel, adapters: dict[str, Path]
) -> None:
    requests = [engine_request for _, engine_request in _cases(base, adapters)]
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    core = EngineCore(base, SchedulerConfig(max_batch_size=5, max_batch_tokens=4096, prefill_chunk_tokens=7))
    arrivals = [0, 0, 1, 2, 2, 3, 5, 5, 6, 8, 9, 9, 10, 11]
    assert _staggered(core, requests, arrivals=arrivals) == solo


def test_each_lora_task_changes_the_output(base: BaseModel, adapters: dict[str, Path]) -> None:
    outputs = {
        name: tuple(
            generate(base, [_request(base, name, PROMPTS[1], _loaded(base, adapters[name]))])[0].token_ids
        )
        for name in _lora_tasks(base)
    }
    outputs["base"] = tuple(
        generate(base, [request(base, "base", PROMPTS[1], max_new_tokens=NEW_TOKENS)])[0].token_ids
    )
    assert len(set(outputs.values())) == len(outputs)


def test_the_peft_native_peft_round_trip_keeps_the_tokens(
    base: BaseModel, adapters: dict[str, Path], tmp_path: Path
) -> None:
    prompt_ids = base.tokenizer(PROMPTS[1]).input_ids
    for name in _lora_tasks(base):
        loaded, _ = load_prefix_source(adapters[name], base.geometry, PrefixLimits())
        native = decode_native(encode_native(loaded, base.geometry), base.geometry, PrefixLimits())
        assert isinstance(native, LoraAdapter)
        assert {k: (m.rank, m.alpha) for k, m in native.modules.items()} == {
            k: (m.rank, m.alpha) for k, m in loaded.modules.items()
        }
        back = write_peft_folder(native, base.geometry, tmp_path / name)
        assert _reference(base, back, prompt_ids) == _reference(base, adapters[name], prompt_ids), name


def test_a_long_chunk_beside_decoding_rows_is_applied_adapter_by_adapter(base: BaseModel) -> None:
    """Padding a 40-token chunk for each of three adapters would nearly triple the work: that pass goes
    adapter by adapter."""
    one, two, three = (_random_lora(base, seed) for seed in (1, 2, 3))
    by_adapter = LoraRows.of([one, two, two, None, three], [40, 1, 1, 3, 1], base.device)
    stacked = LoraRows.of([one, two, None], [2, 2, 1], base.device)
    assert by_adapter is not None and not by_adapter.stacked
    assert stacked is not None and stacked.stacked
    assert [segment.tolist() for segment in by_adapter.segments[1:]] == [[40, 41], [45]]
    assert LoraRows.of([None, None], [3, 1], base.device) is None


def _random_lora(base: BaseModel, seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    projection = base.geometry.projections[0]
    a = torch.randn(4, projection.in_features, generator=generator)
    b = torch.randn(projection.out_features, 4, generator=generator)
    return LoraAdapter({projection.name: LoraModule(a, b, 8.0)})


def test_stacked_and_per_adapter_updates_agree(
    base: BaseModel, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same pass computed stacked and adapter by adapter: the same logits (to float32 rounding)."""
    loras = [_loaded(base, adapters[name])["lora"] for name in _lora_tasks(base)]
    requests = [
        _request(base, f"r{i}", PROMPTS[i % 2], {"lora": lora}) for i, lora in enumerate([*loras, None])
    ]
    results = {}
    for padding in (100, 0):  # every pass stacked; every pass adapter by adapter
        monkeypatch.setattr(lora_rows, "MAX_PADDING_FACTOR", padding)
        results[padding] = [r.token_ids for r in generate(base, requests)]
    assert results[100] == results[0]
