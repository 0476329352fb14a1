"""``prefix-serve train``: learn a task's prefix (or soft prompt) on the frozen base model, export it,
optionally push it."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

from server.cli.argtypes import positive_int
from server.training.config import MAX_DEFAULT_WARMUP_STEPS, METHODS

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"  # where --push uploads without --server or PREFIX_SERVE_URL

# option name -> TrainConfig field; every one defaults to None ("not given"), so a resumed run can tell
# what the user asked for from what it should take from its checkpoint
_CONFIG_OPTIONS = (
    "method",
    "num_virtual_tokens",
    "epochs",
    "lr",
    "batch_size",
    "seed",
    "warmup_steps",
    "lr_schedule",
    "weight_decay",
    "max_grad_norm",
    "prefix_projection",
    "projection_hidden",
    "init_text",
    "init_std",
    "max_steps",
    "lora_r",
    "lora_alpha",
    "target_modules",
)


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a prefix (prefix tuning), a soft prompt (prompt tuning) or a LoRA on the frozen base "
        "model, export it, optionally push it",
        description=(
            "Train a prefix (Li & Liang, 2021), with --method prompt-tuning a soft prompt (Lester et al., "
            "2021), or with --method lora a LoRA (Hu et al., 2021), with the base model frozen. FILE.jsonl holds one "
            '{"prompt": str, "completion": str} per line; the loss is on completion tokens only. Writes '
            "DIR/prefix.safetensors (native), DIR/peft/ (a PEFT PREFIX_TUNING adapter, or PROMPT_TUNING, or LORA), "
            "DIR/training.json and DIR/checkpoint.safetensors (per epoch; --resume continues from it)."
        ),
    )
    train.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="as serve's --model: a built-in model (smollm2-135m-instruct, demo), a .gguf file, a "
        "Hugging Face model folder or a hub id (default: smollm2-135m-instruct)",
    )
    train.add_argument(
        "--data", type=Path, required=True, metavar="FILE.jsonl", help="training examples (required)"
    )
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (required)")
    train.add_argument(
        "--eval-data",
        type=Path,
        metavar="FILE.jsonl",
        help="examples for a per-epoch eval loss (default: none, no eval loss)",
    )
    hyper = train.add_argument_group("training")
    hyper.add_argument(
        "--method",
        choices=METHODS,
        help="what is learned: prefix (keys and values in every layer), prompt-tuning (a soft prompt: "
        "input embeddings before the prompt, initialised from the embeddings of --init-text's tokens, "
        "else of tokens sampled from the vocabulary, as PEFT's TEXT and SAMPLE_VOCAB; exported as a PEFT "
        "PROMPT_TUNING adapter) or lora (low-rank updates of the projections, PEFT's LoraConfig: A "
        "Kaiming-uniform, B zero; exported as a PEFT LORA adapter) (default: prefix)",
    )
    hyper.add_argument("--lora-r", type=int, help="--method lora: the rank of every update (default: 8)")
    hyper.add_argument(
        "--lora-alpha", type=float, help="--method lora: updates are scaled by alpha / r (default: 16)"
    )
    hyper.add_argument(
        "--target-modules",
        type=_names,
        metavar="NAME[,NAME...]",
        help="--method lora: the projections to adapt, as PEFT's target_modules (a module whose path is a "
        "NAME or ends in .NAME), e.g. q_proj,v_proj (default: every projection of the attention blocks)",
    )
    hyper.add_argument(
        "--num-virtual-tokens",
        type=int,
        help="prefix or soft prompt length (default: 20; with --init-text: the text's token count)",
    )
    hyper.add_argument("--epochs", type=int, help="passes over the data, in total (default: 3)")
    hyper.add_argument("--lr", type=float, help="peak AdamW learning rate (default: 1e-2)")
    hyper.add_argument("--batch-size", type=int, help="examples per optimizer step (default: 8)")
    hyper.add_argument(
        "--seed", type=int, help="initialisation and data order; reruns are bit-identical (default: 0)"
    )
    hyper.add_argument(
        "--warmup-steps",
        type=int,
        help="linear learning-rate warm-up, fewer than the run's steps "
        f"(default: a tenth of the run's steps, at most {MAX_DEFAULT_WARMUP_STEPS})",
    )
    hyper.add_argument(
        "--lr-schedule",
        choices=["constant", "linear"],
        help="after warm-up: linear decay to 0, or constant; only constant runs can be extended "
        "(default: linear)",
    )
    hyper.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0)")
    hyper.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off (default: 1.0)")
    hyper.add_argument(
        "--prefix-projection",
        action=argparse.BooleanOptionalAction,
        help="reparameterise through an MLP, folded into plain K/V at export; prefix only (default: off)",
    )
    hyper.add_argument("--projection-hidden", type=int, help="hidden width of that MLP (default: 512)")
    hyper.add_argument(
        "--init-text",
        help="initialise from the frozen model's own K/V of this text, or with --method prompt-tuning from "
        "its tokens' embeddings (default: random; prompt-tuning: sampled vocabulary tokens' embeddings)",
    )
    hyper.add_argument(
        "--init-std", type=float, help="std of a random prefix initialisation; prefix only (default: 1.0)"
    )
    hyper.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps in total, with a checkpoint (default: no limit)",
    )
    hyper.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (default: off, a new run)",
    )
    run = train.add_argument_group("running")
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to train (default: auto, cuda if available)",
    )
    run.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="the base model's dtype; the prefix trains in float32 "
        "(default: auto, float32 on cpu, bfloat16 or float16 on cuda)",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads, recorded in training.json; a bit-identical rerun needs the same count "
        "(default: torch's, one per core)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar, per-epoch lines only (default: a progress bar on a terminal)",
    )
    push = train.add_argument_group("upload when done")
    push.add_argument(
        "--push",
        metavar="TASK_ID",
        help="upload the prefix or soft prompt to a server as TASK_ID (default: no upload)",
    )
    push.add_argument(
        "--server", help=f"server URL (default: env PREFIX_SERVE_URL, else {DEFAULT_SERVER_URL})"
    )
    push.add_argument(
        "--api-key", help="an admin key of the tenant (default: env PREFIX_SERVE_API_KEY, else none)"
    )
    train.set_defaults(handler=_train)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def _train(args: argparse.Namespace) -> int:
    from prefix_store.errors import InvalidName
    from prefix_store.storage.names import validate_task_id
    from server.training.errors import TrainingError

    if args.push is not None:
        try:
            validate_task_id(args.push)  # before training: a bad name should not cost a run
        except InvalidName as exc:
            return _fail(f"--push: {exc}")
    # deterministic cuBLAS for a bit-identical rerun on CUDA; read when CUDA first runs a matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        result = _train_and_export(args)
    except TrainingError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; {args.out} keeps the checkpoint of the last finished epoch (--resume continues)",
            file=sys.stderr,
        )
        return 130
    if args.push is not None:
        try:
            _push(args, result.native_path)
        except TrainingError as exc:
            return _fail(f"{exc} (the trained prefix is in {args.out})")
    return 0


def _train_and_export(args: argparse.Namespace) -> Any:
    from server import model_source
    from server.engine.base_model import load_base_model
    from server.training.errors import TrainingError
    from server.training.model_facts import ModelFacts, read_model_facts
    from server.training.run import RunPaths, prepare_run, run_training

    @functools.cache
    def source() -> model_source.ModelSource:  # first asked once the data has passed the model-free checks
        try:
            return model_source.resolve_model(args.model)
        except model_source.ModelSourceError as exc:
            raise TrainingError(f"--model {args.model}: {exc}") from None

    def model_facts() -> ModelFacts:
        return read_model_facts(source().path)

    options = {name: getattr(args, name) for name in _CONFIG_OPTIONS if getattr(args, name) is not None}
    model_name = args.model or model_source.DEFAULT_MODEL
    paths = RunPaths(model=model_name, data=args.data, eval_data=args.eval_data, out_dir=args.out)
    run = prepare_run(paths, options, model_facts, resume=args.resume)
    model_path = source().path
    print(
        f"{len(run.train)} training examples: {run.total_steps} steps "
        f"({run.config.steps_per_epoch(len(run.train))} per epoch × {run.config.epochs} epochs), "
        f"warm-up {run.config.warmup_steps} steps"
    )
    try:
        base = load_base_model(model_path, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the model {model_path}: {exc}") from None
    print(f"base model {model_path} ({base.geometry.fingerprint}) on {base.device}, {base.dtype}")
    result = run_training(
        base,
        run,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
        on_epoch=lambda record, epochs: print(_epoch_line(record, epochs), flush=True),
    )
    print(_size_line(result.config, result.summary))
    if not result.finished:
        print(f"stopped after {result.state.global_step} steps (--max-steps); --resume continues the run")
    print(
        f"wrote {result.native_path} (native), {result.peft_dir}/ (PEFT adapter), {args.out / 'training.json'}"
    )
    return result


def _size_line(config: Any, summary: dict[str, Any]) -> str:
    base = f"of the base model's {summary['base_parameters']:,}"
    if config.method == "prompt-tuning":
        trained = summary["trainable_parameters"]
        return (
            f"soft prompt: {config.num_virtual_tokens} virtual tokens = {trained:,} parameters "
            f"({100 * trained / summary['base_parameters']:.3f}% {base}); served as a prefix of "
            f"{summary['prefix_parameters']:,} keys and values"
        )
    return (
        f"prefix: {config.num_virtual_tokens} virtual tokens = {summary['prefix_parameters']:,} parameters "
        f"({100 * summary['prefix_fraction_of_base']:.3f}% {base}); "
        f"trained {summary['trainable_parameters']:,} parameters"
        + (" through the projection MLP" if config.prefix_projection else "")
    )


def _epoch_line(record: Any, epochs: int) -> str:
    eval_part = f"  eval loss {record.eval_loss:.4f}" if record.eval_loss is not None else ""
    return (
        f"epoch {record.epoch}/{epochs}  train loss {record.train_loss:.4f}{eval_part}  "
        f"{record.tokens_per_second:,.0f} tok/s  {record.seconds:.1f} s"
    )


def _push(args: argparse.Namespace, native_path: Path) -> None:
    from server.training.push import push_prefix

    server_url = args.server or os.environ.get("PREFIX_SERVE_URL") or DEFAULT_SERVER_URL
    api_key = args.api_key or os.environ.get("PREFIX_SERVE_API_KEY")
    answer = push_prefix(native_path, args.push, server_url=server_url, api_key=api_key)
    print(f"pushed task {answer.get('task_id', args.push)} to {server_url}: version {answer.get('version')}")


def _fail(message: str) -> int:
    print(f"prefix-serve train: error: {message}", file=sys.stderr)
    return 1
