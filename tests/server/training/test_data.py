"""Bad data is refused with a message naming the file and line, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main
from server.engine.base_model import BaseModel
from server.training.data import epoch_batches, load_dataset
from server.training.errors import TrainingDataError
from tests.server.training.helpers import PROMPTS, fixed_answer_data, train, write_jsonl

GOOD = {"prompt": "the cat is good", "completion": " OK"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "the cat", "completion": " OK"', "line 3: malformed JSON"),
        ('["the cat", " OK"]', "line 3: expected a JSON object"),
        ('{"prompt": "the cat"}', "line 3: missing field 'completion'"),
        ('{"completion": " OK"}', "line 3: missing field 'prompt'"),
        ('{"prompt": "the cat", "completion": ""}', "line 3: field 'completion' is empty"),
        ('{"prompt": "", "completion": " OK"}', "line 3: field 'prompt' is empty"),
        ('{"prompt": 7, "completion": " OK"}', "line 3: field 'prompt' must be a string, got int"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_written(
    llama_base: BaseModel, tmp_path: Path, bad_line: str, message: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n"
    )
    out = tmp_path / "out"
    with pytest.raises(TrainingDataError) as caught:
        train(llama_base, data, out)
    assert f"{data} {message}" in str(caught.value)
    assert not out.exists()


def test_too_long_for_the_model_names_the_line_and_the_numbers(gpt2_base: BaseModel, tmp_path: Path) -> None:
    """The tiny GPT-2 has 256 positions: prefix + prompt + completion must fit."""
    long_prompt = " ".join(["hello"] * 300)
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"prompt": long_prompt, "completion": " OK"}])
    out = tmp_path / "out"
    with pytest.raises(TrainingDataError) as caught:
        train(gpt2_base, data, out)
    message = str(caught.value)
    assert message.startswith(
        f"{data} line 2: too long for the model: prefix (4) + prompt (301) + completion"
    )
    assert message.endswith("positions, but the model supports 256")
    assert not out.exists()


def test_bad_eval_data_is_refused_too_and_blank_lines_are_skipped(
    llama_base: BaseModel, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n" + '{"prompt": "a", "completion": " b", "extra": 1}\n\n')
    dataset = load_dataset(data, llama_base.tokenizer, num_virtual_tokens=4, max_positions=2048)
    assert [example.line for example in dataset.examples] == [2]
    assert dataset.examples[0].completion_ids[-1] == llama_base.tokenizer.eos_token_id  # learns to stop
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a"}])
    with pytest.raises(TrainingDataError, match=r"eval\.jsonl line 1: missing field 'completion'"):
        train(llama_base, data, tmp_path / "out", eval_data=bad_eval)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TrainingDataError, match="holds no examples"):
        train(llama_base, empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_the_message_and_exits_1(demo_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"prompt": "x", "completion": ""}])
    out = tmp_path / "out"
    code = main(["train", "--model", str(demo_model_dir), "--data", str(data), "--out", str(out)])
    assert code == 1
    assert f"prefix-serve train: error: {data} line 2: field 'completion' is empty" in capsys.readouterr().err
    assert not out.exists()


def test_epoch_order_depends_on_seed_and_epoch_only(llama_base: BaseModel, tmp_path: Path) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl")
    examples = load_dataset(data, llama_base.tokenizer, num_virtual_tokens=4, max_positions=None).examples
    lines = [
        [[e.line for e in batch] for batch in epoch_batches(examples, 8, seed=s, epoch=e)]
        for s, e in ((0, 0), (0, 0), (0, 1), (1, 0))
    ]
    assert lines[0] == lines[1] != lines[2] != lines[3]
    assert sorted(line for batch in lines[2] for line in batch) == list(range(1, len(PROMPTS) + 1))
