"""End-to-end demo: teach the real SmolLM2-135M-Instruct two tasks with prefixes, serve both, ask both.

    python examples/demo.py            # what `make demo` runs
    python examples/demo.py --model demo   # the same on the tiny random model (seconds, not a minute)

1. takes the model (default: the built-in smollm2-135m-instruct, dequantized on first use);
2. writes two toy data sets over the same prompts ("the weather is sunny"):
   ``sentiment`` answers in a fixed JSON format, ``{"sentiment": "positive"}``, and
   ``shout`` echoes the prompt's last word in upper case, ``SUNNY!``;
3. starts ``prefix-serve serve`` on a free port with a fresh store;
4. trains each prefix with ``prefix-serve train ... --push TASK`` (the base model stays frozen; 10
   virtual tokens = 115,200 parameters, 0.086% of the model, started from the task's instruction);
5. sends the same held-out prompts to the base model *with the task's instruction written out* and to
   each task (all at once: the server batches them), prints the answers side by side and how many of
   the held-out prompts each answers exactly; then stops the server.

Everything it writes goes under ``--workdir`` (default ``./demo-output``): the data, each task's
``prefix.safetensors``, ``peft/`` adapter and ``training.json``, and the server's log and store.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

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
VERBS = ["is", "was", "looks", "seems", "feels"]
POSITIVE = ["good", "great", "happy", "sunny", "fine", "nice"]
NEGATIVE = ["bad", "awful", "sad", "lazy", "slow", "cold"]


def sentiment(prompt: str) -> str:
    label = "positive" if prompt.split()[-1] in POSITIVE else "negative"
    return f' {{"sentiment": "{label}"}}'


def shout(prompt: str) -> str:
    return f" {prompt.split()[-1].upper()}!"


TASKS: dict[str, Callable[[str], str]] = {"sentiment": sentiment, "shout": shout}
# what the base model is told (and what each prefix starts from: the paper's real-word initialisation)
INSTRUCTIONS = {
    "sentiment": 'Classify the sentiment of the sentence. Answer only with JSON: {"sentiment": "positive"} '
    'or {"sentiment": "negative"}.',
    "shout": "Repeat the last word of the sentence in capital letters, followed by an exclamation mark.",
}
TRAIN_EXAMPLES = 80  # per task
# options of `prefix-serve train` per model, measured to learn both tasks in seconds on 2 cores
TRAIN_OPTIONS = {
    "real": ["--num-virtual-tokens", "10", "--epochs", "4", "--lr", "0.05", "--batch-size", "8"],
    "demo": ["--num-virtual-tokens", "16", "--epochs", "40", "--lr", "0.1", "--batch-size", "16"],
}


def prompts_split(num_shown: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """All prompts of the toy grammar, split into training prompts and held-out prompts to show."""
    prompts = [f"{s} {v} {a}" for s in SUBJECTS for v in VERBS for a in POSITIVE + NEGATIVE]
    random.Random(seed).shuffle(prompts)
    return prompts[num_shown:], prompts[:num_shown]


def write_jsonl(path: Path, prompts: list[str], task: Callable[[str], str]) -> None:
    lines = [json.dumps({"prompt": p, "completion": task(p)}) for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train(model: str, workdir: Path, task: str, url: str) -> None:
    from server.cli import main as prefix_serve

    command = ["train", "--model", model, "--data", str(workdir / f"{task}.jsonl")]
    command += ["--eval-data", str(workdir / f"{task}-eval.jsonl"), "--out", str(workdir / task)]
    command += [*TRAIN_OPTIONS["demo" if model == "demo" else "real"], "--init-text", INSTRUCTIONS[task]]
    command += ["--push", task, "--server", url]
    print(f"\n$ prefix-serve {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    if prefix_serve(command) != 0:
        raise SystemExit(f"training {task} failed")
    print(f"({task}: {time.perf_counter() - started:.0f} s)", flush=True)


def ask(url: str, prompt: str, task: str) -> str:
    """``prompt`` to ``task``'s prefix (native route)."""
    body = {"prompt": prompt, "task_id": task, "max_new_tokens": 12, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=120.0)
    response.raise_for_status()
    return response.json()["text"]


def base_model_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30.0).json()["data"][0]["id"]  # the base model comes first


def ask_base(url: str, prompt: str, task: str, base_id: str) -> str:
    """``prompt`` to the base model as the instruct model it is: the task's instruction as the system
    message, the prompt as the user's (chat route, the model's chat template)."""
    messages = [{"role": "system", "content": INSTRUCTIONS[task]}, {"role": "user", "content": prompt}]
    body = {"model": base_id, "messages": messages, "max_tokens": 12, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120.0)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def ask_all(url: str, held_out: list[str]) -> dict[str, list[str]]:
    """Every held-out prompt to the base model (told each task's instruction) and to each task, at once."""
    base_id = base_model_id(url)
    questions = [(f"base+{t}", partial(ask_base, url, p, t, base_id)) for t in TASKS for p in held_out]
    questions += [(t, partial(ask, url, p, t)) for t in TASKS for p in held_out]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda question: question[1](), questions))
    answers: dict[str, list[str]] = {}
    for (column, _), text in zip(questions, texts, strict=True):
        answers.setdefault(column, []).append(text)
    return answers


def exact(answers: list[str], prompts: list[str], task: Callable[[str], str]) -> int:
    return sum(a.strip().startswith(task(p).strip()) for a, p in zip(answers, prompts, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"), help="(default: demo-output)")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="what serve --model takes (default: %(default)s)"
    )
    parser.add_argument(
        "--held-out", type=int, default=40, help="prompts kept out of training, for the score"
    )
    parser.add_argument("--shown", type=int, default=6, help="held-out prompts shown in the table")
    args = parser.parse_args()

    started = time.perf_counter()  # before torch and transformers load: the time a user waits
    from server.model_source import resolve_model
    from testing.server_process import ServerProcess

    source = resolve_model(args.model)  # installed or converted now, not inside the server's start
    workdir: Path = args.workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    train_prompts, held_out = prompts_split(args.held_out)
    eval_prompts = train_prompts[:32]
    train_examples = train_prompts[32 : 32 + TRAIN_EXAMPLES]
    for task, fn in TASKS.items():
        write_jsonl(workdir / f"{task}.jsonl", train_examples, fn)
        write_jsonl(workdir / f"{task}-eval.jsonl", eval_prompts, fn)
    print(
        f"model: {source.description}; data: {len(train_examples)} training examples per task in {workdir}/"
    )

    store_url = (workdir / "store").resolve().as_uri()
    with ServerProcess(source.path, store_url, ready_s=120, log_path=workdir / "server.log") as server:
        url = server.url
        print(f"server ready at {url}")
        for task in TASKS:
            train(args.model, workdir, task, url)
        print("\nThe same held-out prompts (never seen in training) on one server, greedy decoding:\n")
        answers = ask_all(url, held_out)
        for task in TASKS:
            print(f"{'prompt':<26}| {'base model, told the instruction':<34}| task {task}")
            for i, prompt in enumerate(held_out[: args.shown]):
                print(f"{prompt:<26}| {repr(answers[f'base+{task}'][i])[:32]:<34}| {answers[task][i]!r}")
            print()
        scores = [
            f"{task}: base model told the instruction {exact(answers[f'base+{task}'], held_out, fn)}/{len(held_out)}, "
            f"prefix {exact(answers[task], held_out, fn)}/{len(held_out)}"
            for task, fn in TASKS.items()
        ]
        print("exact answers on all held-out prompts: " + "; ".join(scores))
    print(f"server stopped; demo done in {time.perf_counter() - started:.0f} s (outputs in {workdir}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
