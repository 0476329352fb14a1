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


class NotReached(AssertionError):
    """Raised by a loader that a bad file must not get to."""


@pytest.fixture
def loaders(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls that read the model: the tokenizer and config (fast), the weights (slow), and the
    default model's install or conversion; the weights and the install fail the test if reached."""
    import server.demo_model
    import server.engine.base_model
    import server.model_source
    import server.training.model_facts

    calls = {"facts": 0}
    read_facts = server.training.model_facts.read_model_facts

    def counted_read_facts(path: str | Path) -> object:
        calls["facts"] += 1
        return read_facts(path)

    def not_reached(*args: object, **kwargs: object) -> None:
        raise NotReached("a bad data file reached the model loader")

    monkeypatch.setattr(server.training.model_facts, "read_model_facts", counted_read_facts)
    monkeypatch.setattr(server.engine.base_model, "load_base_model", not_reached)
    for module, loader in [
        (server.model_source, "packaged_gguf"),
        (server.model_source, "gguf_folder"),
        (server.demo_model, "ensure_demo_model"),
    ]:
        monkeypatch.setattr(module, loader, not_reached)
    return calls


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot read {data}: No such file or directory"),
        ("malformed", "{data} line 2: malformed JSON"),
        ("bad-eval", "{eval} line 1: missing field 'completion'"),
        ("empty", "{data} holds no examples"),
    ],
)
@pytest.mark.parametrize("model", ["given", "default"])
def test_a_bad_file_fails_before_any_part_of_the_model_is_read(
    loaders: dict[str, int], demo_model_dir: Path, tmp_path: Path, capsys, case: str, message: str, model: str
) -> None:
    data, eval_data, out = tmp_path / "data.jsonl", tmp_path / "eval.jsonl", tmp_path / "out"
    write_jsonl(eval_data, [GOOD] if case != "bad-eval" else [{"prompt": "a"}])
    if case == "malformed":
        data.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "a", "completion": \n')
    elif case == "empty":
        data.write_text("\n\n")
    elif case != "missing":
        write_jsonl(data, [GOOD])
    argv = ["train", "--data", str(data), "--eval-data", str(eval_data), "--out", str(out)]
    argv += (
        ["--model", str(demo_model_dir)] if model == "given" else []
    )  # default: not installed or converted
    assert main(argv) == 1
    expected = message.format(data=data, eval=eval_data)
    assert f"prefix-serve train: error: {expected}" in capsys.readouterr().err
    assert loaders["facts"] == 0 and not out.exists()  # not even the tokenizer was read


def test_a_line_too_long_is_found_with_the_tokenizer_alone(
    loaders: dict[str, int], gpt2_model_dir: Path, tmp_path: Path, capsys
) -> None:
    data = write_jsonl(
        tmp_path / "data.jsonl", [GOOD, {"prompt": " ".join(["hello"] * 300), "completion": " OK"}]
    )
    out = tmp_path / "out"
    assert main(["train", "--model", str(gpt2_model_dir), "--data", str(data), "--out", str(out)]) == 1
    assert f"{data} line 2: too long for the model" in capsys.readouterr().err
    assert loaders["facts"] == 1 and not out.exists()


def test_a_warmup_longer_than_the_run_is_refused_before_the_weights_load(
    loaders: dict[str, int], demo_model_dir: Path, tmp_path: Path, capsys
) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl", prompts=PROMPTS[:10])
    argv = ["train", "--model", str(demo_model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
    assert main([*argv, "--epochs", "2", "--warmup-steps", "10"]) == 1
    error = capsys.readouterr().err
    assert "--warmup-steps 10 is not less than the run's 4 optimizer steps" in error
    assert loaders["facts"] == 1 and not (tmp_path / "out").exists()


def test_epoch_order_depends_on_seed_and_epoch_only(llama_base: BaseModel, tmp_path: Path) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl")
    examples = load_dataset(data, llama_base.tokenizer, num_virtual_tokens=4, max_positions=None).examples
    lines = [
        [[e.line for e in batch] for batch in epoch_batches(examples, 8, seed=s, epoch=e)]
        for s, e in ((0, 0), (0, 0), (0, 1), (1, 0))
    ]
    assert lines[0] == lines[1] != lines[2] != lines[3]
    assert sorted(line for batch in lines[2] for line in batch) == list(range(1, len(PROMPTS) + 1))
