"""Encoder-decoder models, tiny random ones built here: T5 and mT5 (relative position bias, an odd layer
count) and BART and mBART (learned positions, an even one, where PEFT feeds two decoder layers one entry).
PEFT ``SEQ_2_SEQ_LM`` prefixes of different lengths, with and without ``prefix_projection``, and base rows,
over sources of several lengths, all in one mixed batch: each row's greedy tokens equal PEFT's forward
loop. Continuous batching, the PEFT → native → PEFT round trip, each side's positions, and the refusals
(a family the engine does not serve, soft prompts, training)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    MarianConfig,
    MBartConfig,
    MT5Config,
    PegasusConfig,
    PretrainedConfig,
    ProphetNetConfig,
    T5Config,
)

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.peft import encode_peft, write_peft_folder
from prefix_store.formats.source import load_prefix_source
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import BaseModel, load_base_model
from server.engine.core import EngineCore
from server.engine.encoder_decoder import EncoderDecoder
from server.engine.generation import collect_results, generate
from server.engine.lifecycle import FinishReason
from server.engine.model_support import UnsupportedModel
from server.engine.request import (
    GenerationRequest,
    GenerationResult,
    RequestOutput,
    RequestTooLong,
    check_fits,
)
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.training.data import read_records, tokenize_records
from server.training.errors import TrainingError
from server.training.forward import completion_loss
from server.training.prefix_params import DirectPrefix
from testing.peft_reference import make_peft_adapter, make_peft_soft_prompt, peft_seq2seq_greedy_tokens
from tests.server.engine.helpers import random_prefix, request
from tests.server.training.helpers import fixed_answer_data, frozen_weights, train

PROMPTS = ["hi", "the cat sat on the mat today", "Once upon a time there was a little model that learned."]
NEW_TOKENS = 8


def _bart_like(
    config_class: type[PretrainedConfig], init_std: float = 0.2
) -> Callable[[int, int], PretrainedConfig]:
    return lambda vocab, eos: config_class(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=init_std,
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=eos,
    )


def _t5_like(config_class: type[PretrainedConfig]) -> Callable[[int, int], PretrainedConfig]:
    return lambda vocab, eos: config_class(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_heads=4,
        initializer_factor=2.0,
        pad_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=eos,
    )


FAMILIES: dict[str, Callable[[int, int], PretrainedConfig]] = {
    "bart": _bart_like(BartConfig),
    "mbart": _bart_like(MBartConfig),  # pre-norm layers, a final layer norm
    "pegasus": _bart_like(PegasusConfig),  # sinusoidal positions, embeddings scaled by sqrt(d_model)
    # sinusoidal positions, post-norm layers; wider weights: at 0.2 it repeats one token whatever it is told
    "marian": _bart_like(MarianConfig, init_std=0.5),
    "t5": _t5_like(T5Config),
    "mt5": _t5_like(MT5Config),  # gated GELU feed-forward, untied head
}


def unserved_family(vocab_size: int) -> PretrainedConfig:
    """A tiny encoder-decoder of a family the engine does not serve (ProphetNet: n-gram streams)."""
    return ProphetNetConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_encoder_attention_heads=4,
        num_decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )


def _build(config: PretrainedConfig, out: Path) -> Path:
    torch.manual_seed(5)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    build_demo_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BaseModel, Path]:
    tokenizer = build_demo_tokenizer()
    config = FAMILIES[request.param](len(tokenizer), tokenizer.eos_token_id)
    folder = _build(config, tmp_path_factory.mktemp("seq2seq") / request.param)
    return load_base_model(folder, device="cpu", dtype="float32"), folder


def _fresh(folder: Path) -> torch.nn.Module:
    return AutoModelForSeq2SeqLM.from_pretrained(folder, dtype="float32").eval()


def _peft_tokens(folder: Path, adapter: Path | None, source_ids: list[int]) -> list[int]:
    model = _fresh(folder)
    reference = PeftModel.from_pretrained(model, adapter).eval() if adapter is not None else model
    return peft_seq2seq_greedy_tokens(reference, source_ids, NEW_TOKENS)


def test_a_mixed_batch_equals_pefts_forward_loop(family: tuple[BaseModel, Path], tmp_path: Path) -> None:
    base, folder = family
    adapters = [
        make_peft_adapter(_fresh(folder), tmp_path / "p3", num_virtual_tokens=3, seed=30),
        make_peft_adapter(
            _fresh(folder), tmp_path / "p9", num_virtual_tokens=9, prefix_projection=True, seed=31
        ),
    ]
    cases = []
    for adapter in adapters:
        prefix, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
        cases += [
            (adapter, request(base, f"{adapter.name}-{j}", prompt, prefix, max_new_tokens=NEW_TOKENS))
            for j, prompt in enumerate(PROMPTS)
        ]
    cases += [(None, request(base, f"base-{j}", p, max_new_tokens=NEW_TOKENS)) for j, p in enumerate(PROMPTS)]
    results = generate(base, [engine_request for _, engine_request in cases])
    for (adapter, engine_request), result in zip(cases, results, strict=True):
        want = _peft_tokens(folder, adapter, list(engine_request.prompt_ids))
        assert result.token_ids == want, engine_request.request_id
        assert result.prompt_tokens == len(engine_request.prompt_ids)  # the source's
    by_id = {r.request_id: r.token_ids for r in results}
    assert any(by_id[f"p3-{j}"] != by_id[f"base-{j}"] for j in range(len(PROMPTS)))  # the prefix matters


def test_rows_joining_at_different_steps_equal_their_solo_runs(family: tuple[BaseModel, Path]) -> None:
    base, _ = family
    requests = [
        request(
            base, f"r{i}", prompt, random_prefix(base, 2 + 5 * i, seed=i) if i else None, max_new_tokens=6
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    solo = [generate(base, [r])[0].token_ids for r in requests]
    core = EngineCore(base, SchedulerConfig(max_batch_size=4, max_batch_tokens=1024, max_waiting=8))
    outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    for step in range(40):
        if step % 2 == 0 and step // 2 < len(requests):  # each joins rows already decoding
            core.add_request(requests[step // 2])
        for output in core.step():
            outputs[output.request_id].append(output)
    assert [GenerationResult.from_outputs(outputs[r.request_id]).token_ids for r in requests] == solo
    assert core.stats().kv.blocks_used == 0  # every row's source and own blocks went back


def test_peft_native_peft_round_trip_keeps_the_tokens(family: tuple[BaseModel, Path], tmp_path: Path) -> None:
    base, folder = family
    adapter = make_peft_adapter(_fresh(folder), tmp_path / "peft", num_virtual_tokens=4, seed=40)
    prefix, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
    again = write_peft_folder(prefix, base.geometry, tmp_path / "again")
    source_ids = base.tokenizer(PROMPTS[1]).input_ids
    assert _peft_tokens(folder, again, source_ids) == _peft_tokens(folder, adapter, source_ids)


def test_a_prefix_pefts_layout_cannot_hold_is_not_written_as_peft(tmp_path: Path) -> None:
    """BART's two decoder layers read one PEFT entry: a native prefix that differs between them has no PEFT
    form (T5's three layers read three different entries, so every prefix has one)."""
    tokenizer = build_demo_tokenizer()
    bart = load_base_model(
        _build(FAMILIES["bart"](len(tokenizer), tokenizer.eos_token_id), tmp_path / "bart"), device="cpu"
    )
    with pytest.raises(PrefixValidationError, match="decoder layers 0 and 1 hold different keys"):
        encode_peft(random_prefix(bart, 3, seed=1), bart.geometry)


def test_soft_prompts_are_refused_on_an_encoder_decoder(
    family: tuple[BaseModel, Path], tmp_path: Path
) -> None:
    base, folder = family
    soft = make_peft_soft_prompt(_fresh(folder), tmp_path / "soft", num_virtual_tokens=3)
    with pytest.raises(PrefixValidationError, match="soft prompts are served on decoder-only models"):
        load_prefix_source(soft, base.geometry, PrefixLimits())


def test_an_encoder_decoder_family_the_engine_does_not_serve_is_refused_at_load(tmp_path: Path) -> None:
    folder = _build(unserved_family(len(build_demo_tokenizer())), tmp_path / "prophetnet")
    with pytest.raises(
        UnsupportedModel, match=r"^prophetnet is an encoder-decoder model of a family the engine"
    ) as err:
        load_base_model(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_the_training_loss_is_pefts_forward_loss(family: tuple[BaseModel, Path], tmp_path: Path) -> None:
    """The teacher-forced loss of a batch of examples of different source and target lengths (padded
    together) equals the sum of PEFT's forward losses (``labels``) of each example alone."""
    base, folder = family
    prefix = DirectPrefix(base.geometry, random_prefix(base, 5, seed=3))()  # tied as PEFT ties layers
    adapter = write_peft_folder(prefix, base.geometry, tmp_path / "peft")
    examples = tokenize_records(
        read_records(fixed_answer_data(tmp_path / "data.jsonl", prompts=PROMPTS)),
        base.tokenizer,
        num_virtual_tokens=5,
        max_positions=base.max_positions,
    ).examples
    examples = [replace(e, completion_ids=e.completion_ids[: 2 + 3 * i]) for i, e in enumerate(examples)]
    with torch.no_grad():
        loss, tokens = completion_loss(base, prefix, examples)
    reference = PeftModel.from_pretrained(_fresh(folder), adapter).eval()
    want = 0.0
    with torch.no_grad():
        for example in examples:
            source = torch.tensor([example.prompt_ids])
            labels = torch.tensor([example.completion_ids])
            fed = torch.tensor([[base.model.config.decoder_start_token_id, *example.completion_ids[:-1]]])
            mean = reference(
                input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=fed, labels=labels
            ).loss  # the decoder fed its start token, as when generating (mBART's own shift wraps the last)
            want += float(mean) * labels.shape[1]
    assert tokens == sum(len(e.completion_ids) for e in examples)
    assert float(loss) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_a_trained_prefix_is_served_and_loads_in_peft_with_the_same_tokens(
    family: tuple[BaseModel, Path], tmp_path: Path, projection: bool
) -> None:
    """``prefix-serve train`` on an encoder-decoder: the loss falls; the native export served by the engine
    and the PEFT export run by PEFT's forward loop give the same tokens."""
    base, folder = family
    before = frozen_weights(base)
    data = fixed_answer_data(tmp_path / "data.jsonl")
    lr = 0.03 if projection else 0.1  # the MLP's steps are larger: 0.1 overshoots on BART
    result = train(base, data, tmp_path / "out", epochs=20, prefix_projection=projection, lr=lr)
    losses = [record.train_loss for record in result.state.history]
    assert losses[-1] < 0.9 * losses[0], losses  # 0.59-0.82 of the first epoch's on these four tiny models
    assert all(torch.equal(before[name], p) for name, p in base.model.named_parameters())
    assert json.loads((result.peft_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    prefix, _ = load_prefix_source(result.native_path, base.geometry, PrefixLimits())
    for j, prompt in enumerate(PROMPTS):
        (served,) = generate(base, [request(base, f"t{j}", prompt, prefix, max_new_tokens=NEW_TOKENS)])
        assert served.token_ids == _peft_tokens(folder, result.peft_dir, base.tokenizer(prompt).input_ids)


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"method": "prompt-tuning"}, "--method prompt-tuning is for decoder-only models"),
        ({"init_text": "summarize:"}, "--init-text initialises a decoder-only model's prefix"),
    ],
)
def test_what_only_a_decoder_only_model_trains_is_refused_before_training(
    family: tuple[BaseModel, Path], tmp_path: Path, options: dict[str, str], refusal: str
) -> None:
    base, _ = family
    with pytest.raises(TrainingError, match=f"encoder-decoder model: {refusal}"):
        train(base, fixed_answer_data(tmp_path / "data.jsonl"), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_the_source_and_the_decoder_each_fit_their_own_positions(tmp_path: Path) -> None:
    """BART's tables (128 positions here) hold the source in the encoder and prefix + start + new tokens in
    the decoder: 100 source tokens and 60 new ones fit, though together they are 160."""
    tokenizer = build_demo_tokenizer()
    bart = load_base_model(
        _build(FAMILIES["bart"](len(tokenizer), tokenizer.eos_token_id), tmp_path / "bart"), device="cpu"
    )
    long_source = GenerationRequest("fits", [7] * 100, random_prefix(bart, 4, seed=1), SamplingParams(), 60)
    (result,) = generate(bart, [long_source])
    assert len(result.token_ids) == 60 or result.finish_reason is FinishReason.STOP
    with pytest.raises(
        RequestTooLong, match="the prompt has 130 tokens, but the model's encoder supports 128"
    ):
        check_fits(bart, replace(long_source, prompt_ids=[7] * 130), 4)
    with pytest.raises(
        RequestTooLong, match=r"prefix \(4\) \+ decoder start \(1\) \+ max_new_tokens \(124\)"
    ):
        check_fits(bart, replace(long_source, max_new_tokens=124), 4)


def test_prompt_logprobs_are_refused_since_the_source_is_not_predicted(
    family: tuple[BaseModel, Path],
) -> None:
    base, _ = family
    asking = replace(request(base, "asks", PROMPTS[1]), prompt_logprobs=1)
    with pytest.raises(ValueError, match="an encoder-decoder model's prompt is its source"):
        check_fits(base, asking, 0)


def test_a_source_the_encoder_fails_on_ends_its_request_alone(
    family: tuple[BaseModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = family
    failing, fine = request(base, "failing", PROMPTS[2]), request(base, "fine", PROMPTS[1])
    want = generate(base, [fine])[0].token_ids
    encode = EncoderDecoder.encode

    def encode_unless_failing(
        self: EncoderDecoder, source_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if list(source_ids) == list(failing.prompt_ids):
            raise RuntimeError("out of memory")
        return encode(self, source_ids)

    monkeypatch.setattr(EncoderDecoder, "encode", encode_unless_failing)
    core = EngineCore(base, SchedulerConfig(max_batch_size=2, max_batch_tokens=1024, max_waiting=4))
    for engine_request in (failing, fine):
        core.add_request(engine_request)
    results = collect_results(core, [failing, fine])
    assert results[0].finish_reason is FinishReason.ERROR and results[0].token_ids == []
    assert results[1].token_ids == want
    assert core.stats().kv.blocks_used == 0 and not core.has_work
