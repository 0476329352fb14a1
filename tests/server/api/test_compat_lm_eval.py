"""lm-eval's ``local-completions`` against a live server, with its default settings (the server's remote
tokenizer, tokenized requests) and ``batch_size`` 2: a ``multiple_choice`` task and a ``generate_until``
task on small local JSONL datasets, run to completion. The multiple-choice answers are PEFT's: the argmax
of its summed continuation logprobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from server.engine.base_model import BaseModel
from testing.peft_reference import make_peft_adapter, peft_logprobs
from tests.server.api.live_server import live_server

pytestmark = pytest.mark.e2e  # starts a server

TASK = "evaluated"
QUESTIONS = [
    ("The sky is", ["blue", "green", "loud"], 0),
    ("Two plus two is", ["four", "seven"], 0),
    ("Cats like to", ["sleep", "fly", "swim", "sing"], 0),
    ("A year has", ["twelve months", "three days"], 0),
    ("Water is", ["wet", "dry", "square"], 0),
]
PROMPTS = ["Once upon a time", "The weather today", "My favourite food"]


@pytest.fixture(scope="module")
def adapter(llama_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(llama_base.model.name_or_path, dtype="float32")
    return make_peft_adapter(model, tmp_path_factory.mktemp("peft") / "a", num_virtual_tokens=6, seed=21)


@pytest.fixture(scope="module")
def server_url(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter: Path
) -> Iterator[str]:
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url:
        files = {
            name: (file, (adapter / file).read_bytes())
            for name, file in (
                ("adapter_config", "adapter_config.json"),
                ("adapter_model", "adapter_model.safetensors"),
            )
        }
        assert httpx.put(f"{url}/v1/admin/prefixes/{TASK}", files=files, timeout=60).status_code == 201
        yield url


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval task definitions over local JSONL files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    (root / "choices.jsonl").write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (root / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    common = "dataset_path: json\ntest_split: train\noutput_type: {kind}\ndataset_kwargs:\n  data_files:\n    train: {data}\n"
    (root / "mc.yaml").write_text(
        "task: prefix_serve_mc\n"
        + common.format(kind="multiple_choice", data=root / "choices.jsonl")
        + "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        + "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n"
    )
    (root / "gen.yaml").write_text(
        "task: prefix_serve_gen\n"
        + common.format(kind="generate_until", data=root / "prompts.jsonl")
        + "doc_to_text: '{{text}}'\ndoc_to_target: ''\n"
        + "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n"
    )
    return root


def _evaluate(server_url: str, tasks_dir: Path, task: str) -> dict:
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={TASK},base_url={server_url}/v1/completions,num_concurrent=1,max_retries=1",
        tasks=[task],
        batch_size=2,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
    )


def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's split of context and continuation into tokens (trailing spaces move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def test_multiple_choice_answers_are_pefts_argmax(
    server_url: str, tasks_dir: Path, llama_base: BaseModel, adapter: Path
) -> None:
    results = _evaluate(server_url, tasks_dir, "prefix_serve_mc")
    samples = sorted(results["samples"]["prefix_serve_mc"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(QUESTIONS)
    model = AutoModelForCausalLM.from_pretrained(llama_base.model.name_or_path, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    tokenizer = llama_base.tokenizer
    picked = []
    for (question, choices, _), sample in zip(QUESTIONS, samples, strict=True):
        totals = []
        for choice in choices:
            context, continuation = _encode_pair(tokenizer, question, " " + choice)
            rows = peft_logprobs(peft_model, context + continuation)
            totals.append(sum(float(rows[len(context) + i - 1, t]) for i, t in enumerate(continuation)))
        scored = [loglikelihood for loglikelihood, _ in (resp[0] for resp in sample["resps"])]
        assert scored == pytest.approx(totals, abs=2e-3 * max(len(c) for c in choices))
        picked.append(max(range(len(choices)), key=lambda i: scored[i]))
        assert max(range(len(choices)), key=lambda i: totals[i]) == picked[-1]
    accuracy = sum(p == answer for p, (_, _, answer) in zip(picked, QUESTIONS, strict=True)) / len(QUESTIONS)
    assert results["results"]["prefix_serve_mc"]["acc,none"] == pytest.approx(accuracy)


def test_generate_until_runs_to_completion_as_the_server_answers(
    server_url: str, tasks_dir: Path, llama_base: BaseModel
) -> None:
    results = _evaluate(server_url, tasks_dir, "prefix_serve_gen")
    samples = sorted(results["samples"]["prefix_serve_gen"], key=lambda sample: sample["doc_id"])
    generated = [sample["resps"][0][0] for sample in samples]
    assert len(generated) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, generated, strict=True):
        prompt_ids = llama_base.tokenizer(prompt, add_special_tokens=False).input_ids  # as lm-eval sends it
        direct = httpx.post(
            f"{server_url}/v1/completions",
            json={"model": TASK, "prompt": prompt_ids, "max_tokens": 8, "temperature": 0, "stop": ["\n\n"]},
            timeout=60,
        ).json()
        assert text == direct["choices"][0]["text"]
