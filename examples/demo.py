"""End-to-end demo: train two prefixes for the offline demo model, serve both, ask both the same thing.

    python examples/demo.py            # what `make demo` runs (about 45 s on 2 idle CPU cores)

1. builds the offline demo model (random weights, 4 layers) if it is not cached yet;
2. writes two toy data sets over the same prompts ("the weather is sunny"):
   ``sentiment`` answers in a fixed JSON format, ``{"sentiment": "positive"}``, and
   ``shout`` echoes the prompt's last word in upper case, ``SUNNY!``;
3. starts ``prefix-serve serve`` on a free port with a fresh store;
4. trains each prefix with ``prefix-serve train ... --push TASK`` (the base model stays frozen);
5. sends the same held-out prompts with no task, with ``sentiment`` and with ``shout``, prints the
   answers side by side and how many of the 40 held-out prompts each task answers exactly
   (sentiment 35, shout 34 on a 2-core Intel Xeon VM, torch 2.13 CPU); then stops the server.

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
# per task: options of `prefix-serve train`, measured to learn each task in well under a minute on 2 idle cores;
# sentiment starts from real-word activations (--init-text), shout from random vectors
TRAIN_OPTIONS = {
    "sentiment": [
        *("--init-text", "Classify the sentiment of this review as positive or negative."),
        *("--epochs", "15", "--lr", "0.1", "--batch-size", "16"),
    ],
    "shout": ["--epochs", "40", "--lr", "0.1", "--batch-size", "16", "--num-virtual-tokens", "16"],
}


def prompts_split(num_shown: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """All prompts of the toy grammar, split into training prompts and held-out prompts to show."""
    prompts = [f"{s} {v} {a}" for s in SUBJECTS for v in VERBS for a in POSITIVE + NEGATIVE]
    random.Random(seed).shuffle(prompts)
    return prompts[num_shown:], prompts[:num_shown]


def write_jsonl(path: Path, prompts: list[str], task: Callable[[str], str]) -> None:
    lines = [json.dumps({"prompt": p, "completion": task(p)}) for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train(model_dir: Path, workdir: Path, task: str, url: str) -> None:
    from server.cli import main as prefix_serve

    command = ["train", "--model", str(model_dir), "--data", str(workdir / f"{task}.jsonl")]
    command += ["--eval-data", str(workdir / f"{task}-eval.jsonl"), "--out", str(workdir / task)]
    command += [*TRAIN_OPTIONS[task], "--push", task, "--server", url]
    print(f"\n$ prefix-serve {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    if prefix_serve(command) != 0:
        raise SystemExit(f"training {task} failed")
    print(f"({task}: {time.perf_counter() - started:.0f} s)", flush=True)


def ask(url: str, prompt: str, task: str | None) -> str:
    body = {"prompt": prompt, "task_id": task, "max_new_tokens": 16, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=60.0)
    response.raise_for_status()
    return response.json()["text"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"))
    parser.add_argument(
        "--held-out", type=int, default=40, help="prompts kept out of training, for the score"
    )
    parser.add_argument("--shown", type=int, default=6, help="held-out prompts shown in the table")
    args = parser.parse_args()

    started = time.perf_counter()  # before torch and transformers load: the time a user waits
    from server.benchmark.server_process import ServerProcess
    from server.demo_model import ensure_demo_model

    model_dir = ensure_demo_model()
    workdir: Path = args.workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    train_prompts, held_out = prompts_split(args.held_out)
    eval_prompts = train_prompts[:32]
    for task, fn in TASKS.items():
        write_jsonl(workdir / f"{task}.jsonl", train_prompts[32:], fn)
        write_jsonl(workdir / f"{task}-eval.jsonl", eval_prompts, fn)
    print(
        f"demo model: {model_dir}; data: {len(train_prompts) - 32} training examples per task in {workdir}/"
    )

    store_url = (workdir / "store").resolve().as_uri()
    with ServerProcess(model_dir, store_url, ready_s=120, log_path=workdir / "server.log") as server:
        url = server.url
        print(f"server ready at {url}")
        for task in TASKS:
            train(model_dir, workdir, task, url)
        print("\nThe same held-out prompts (never seen in training) on one server, greedy decoding:\n")
        answers = {task: [ask(url, prompt, task) for prompt in held_out] for task in (None, *TASKS)}
        width = max(len(p) for p in held_out[: args.shown]) + 2
        print(f"{'prompt':<{width}}| {'no task (base model)':<26}| {'task sentiment':<28}| task shout")
        print("-" * (width + 72))
        for i, prompt in enumerate(held_out[: args.shown]):
            base_answer = repr(answers[None][i])[:24]
            print(
                f"{prompt:<{width}}| {base_answer:<26}| {answers['sentiment'][i]!r:<28}| {answers['shout'][i]!r}"
            )
        scores = [
            f"{task} {sum(a.strip() == fn(p).strip() for a, p in zip(answers[task], held_out, strict=True))}"
            f"/{len(held_out)}"
            for task, fn in TASKS.items()
        ]
        print("\nexact answers on all held-out prompts: " + ", ".join(scores))
    print(f"server stopped; demo done in {time.perf_counter() - started:.0f} s (outputs in {workdir}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
