"""The quality benchmark's other methods, trained exactly like ``prefix-serve train`` trains a prefix.

``python -m bench.quality.baseline_training --method prompt-tuning|lora|full ...`` trains PEFT prompt
tuning (Lester et al., 2021), PEFT LoRA (Hu et al., 2021) or the whole model (full fine-tuning) on the
same JSONL file with the same recipe as ``prefix-serve train``: the same tokenisation (the completion
followed by EOS, loss on completion tokens only), the same batches in the same order (``epoch_batches``),
the same AdamW learning-rate schedule (``learning_rate``), the same gradient clipping. Only what learns
differs. It then writes what the server can serve:

- prompt tuning: ``prefix.safetensors``, the soft prompt's keys and values in every layer. A soft prompt
  is the first ``P`` input positions; under causal attention their keys and values depend on nothing
  after them, so the frozen model run once on the prompt embeddings gives a deep prefix that conditions
  the prompt exactly as the soft prompt does (keys after the rotary embedding of positions ``0…P-1``;
  the prompt then takes positions ``P…``, as for a prefix). Also ``peft/``, PEFT's own adapter.
- LoRA: ``peft/``, PEFT's own ``LORA`` adapter (unmerged), which uploads to the server as a task.
- full fine-tuning: ``model/``, the trained model.

And ``training.json``: trained parameters, steps, seconds, losses.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.engine.base_model import max_positions_of
from server.training.config import TrainConfig
from server.training.data import Example, epoch_batches, load_dataset
from server.training.determinism import pinned_threads
from server.training.forward import IGNORE
from server.training.loop import learning_rate

METHODS = ("prompt-tuning", "lora", "full")


def right_padded(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, targets)``, each ``[B, T]``; ``targets[b, t]`` is the token that
    position ``t`` should predict (``IGNORE`` outside the completion). Right padding keeps every row's
    positions ``0…``, as when the row is served alone."""
    width = max(example.num_tokens for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(example.prompt_ids)  # position start - 1 predicts the first completion token
        targets[row, start - 1 : len(ids) - 1] = torch.tensor(example.completion_ids)
    return input_ids, attention_mask, targets


def completion_loss(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, virtual_tokens: int
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the completion tokens, and their count (the prefix trainer's loss)."""
    input_ids, attention_mask, targets = right_padded(examples, pad_id)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, virtual + T, V]
    logits = logits[:, virtual_tokens:].float()  # a soft prompt's own positions predict nothing
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def wrap(base: PreTrainedModel, args: argparse.Namespace) -> torch.nn.Module:
    """The model whose trainable parameters are the method's."""
    if args.method == "full":
        return base.train(False).requires_grad_(True)
    if args.method == "lora":
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
    else:
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=args.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if args.init_text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=args.init_text,
            tokenizer_name_or_path=args.model,
        )
    return get_peft_model(base, config).train(False)  # eval mode: no dropout, as the prefix trainer


@torch.no_grad()
def soft_prompt_as_prefix(model: PeftModel) -> Prefix:
    """The keys and values the frozen model computes for the soft prompt, in every layer."""
    embeddings = model.get_prompt(batch_size=1)  # [1, P, hidden]
    base = model.get_base_model()
    cache = base(inputs_embeds=embeddings, use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, P, head_dim]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return Prefix(keys.float().contiguous(), values.float().contiguous())


def export(model: torch.nn.Module, tokenizer, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method == "prompt-tuning":
        geometry = ModelGeometry.from_config(model.get_base_model().config)
        (args.out / "prefix.safetensors").write_bytes(encode_native(soft_prompt_as_prefix(model), geometry))
        model.save_pretrained(args.out / "peft")
        return
    if args.method == "lora":
        model.save_pretrained(args.out / "peft")
        return
    model.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")


def train(args: argparse.Namespace) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base.requires_grad_(False)
    config = TrainConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    virtual_tokens = args.num_virtual_tokens if args.method == "prompt-tuning" else 0
    data = load_dataset(
        args.data, tokenizer, num_virtual_tokens=virtual_tokens, max_positions=max_positions_of(base.config)
    )
    torch.manual_seed(args.seed)
    model = wrap(base, args)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.total_steps(len(data))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    history: list[dict] = []
    step = 0
    for epoch in range(config.epochs):
        epoch_sum, epoch_tokens, started = 0.0, 0, time.perf_counter()
        for batch in epoch_batches(data.examples, config.batch_size, seed=config.seed, epoch=epoch):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, num_targets = completion_loss(model, batch, pad_id, virtual_tokens)
            (loss_sum / num_targets).backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total_steps)
            optimizer.step()
            step += 1
            epoch_sum += float(loss_sum.detach())
            epoch_tokens += num_targets
        loss, seconds = epoch_sum / max(1, epoch_tokens), time.perf_counter() - started
        history.append({"epoch": epoch + 1, "train_loss": loss, "seconds": seconds})
        print(f"{args.method}: epoch {epoch + 1}/{config.epochs}  train loss {loss:.4f}", flush=True)
    export(model, tokenizer, args)
    # the keys of prefix-serve train's training.json that the benchmark reads
    return {
        "method": args.method,
        "config": config.to_json(),
        "steps": step,
        "history": history,
        "trainable_parameters": sum(p.numel() for p in parameters),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--data", type=Path, required=True, help='JSONL of {"prompt", "completion"}')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-virtual-tokens", type=int, default=10, help="prompt tuning's soft prompt length"
    )
    parser.add_argument("--init-text", help="prompt tuning: initialise from this text's embeddings")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with pinned_threads(args.threads):
        summary = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
