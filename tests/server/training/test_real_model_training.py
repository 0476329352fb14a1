"""`prefix-serve train` on the real SmolLM2-135M-Instruct learns a task its base model does not do when
told to: a sentiment label in a fixed JSON format, on held-out sentences."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.cli import main
from server.engine.base_model import BaseModel, load_base_model
from server.engine.generation import generate
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

pytestmark = pytest.mark.real_model

INSTRUCTION = 'Classify the sentiment of the sentence. Answer only with JSON: {"sentiment": "positive"} or {"sentiment": "negative"}.'
POSITIVE, NEGATIVE = (
    ["good", "great", "happy", "sunny", "fine", "nice"],
    ["bad", "awful", "sad", "lazy", "slow", "cold"],
)
SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the model",
    "the weather",
    "a little fox",
    "the server",
    "our team",
]


def label(sentence: str) -> str:
    return f' {{"sentiment": "{"positive" if sentence.split()[-1] in POSITIVE else "negative"}"}}'


def answers(base: BaseModel, prompts: list[list[int]], prefix: object = None) -> list[str]:
    requests = [
        GenerationRequest(
            request_id=str(i),
            prompt_ids=ids,
            prefix=prefix,  # type: ignore[arg-type]
            sampling=SamplingParams(),
            max_new_tokens=10,
            stop_sequences=(),
        )
        for i, ids in enumerate(prompts)
    ]
    return [base.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in generate(base, requests)]


def test_a_short_run_beats_the_base_model_told_the_instruction(
    smollm2_model_dir: Path, tmp_path: Path
) -> None:
    sentences = [
        f"{s} {v} {a}" for s, v, a in itertools.product(SUBJECTS, ["is", "looks"], POSITIVE + NEGATIVE)
    ]
    random.Random(0).shuffle(sentences)
    train, held_out = sentences[:40], sentences[40:64]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": s, "completion": label(s)}) + "\n" for s in train))
    out = tmp_path / "out"
    argv = ["train", "--model", str(smollm2_model_dir), "--data", str(data), "--out", str(out), "--seed", "0"]
    argv += ["--num-virtual-tokens", "10", "--epochs", "3", "--lr", "0.05", "--batch-size", "8"]
    assert main([*argv, "--init-text", INSTRUCTION]) == 0

    base = load_base_model(smollm2_model_dir, device="cpu", dtype="float32")
    prefix, _ = load_prefix_source(out / "prefix.safetensors", base.geometry, PrefixLimits())
    tuned = answers(base, [base.tokenizer(s).input_ids for s in held_out], prefix)
    told = answers(
        base,
        [
            base.tokenizer.apply_chat_template(
                [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": s}],
                add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]
            for s in held_out
        ],
    )

    def correct(texts: list[str]) -> int:
        return sum(t.strip().startswith(label(s).strip()) for t, s in zip(texts, held_out, strict=True))

    assert correct(tuned) >= 0.9 * len(held_out), tuned
    assert correct(tuned) > correct(told) + len(held_out) // 4, (tuned, told)
    summary = json.loads((out / "training.json").read_text())
    assert summary["prefix_parameters"] == 10 * 30 * 2 * 3 * 64  # 0.086% of the model's 134.5M
