"""The methods the quality benchmark compares, each with its recipe (one learning rate, one budget).

Every trained method gets the same data, the same batches in the same order, the same number of AdamW
steps with the same schedule (warm-up, linear decay) and clipping; the learning rate is each method's
own, chosen once on the training loss of a short run (none was tuned on the test set). Prefix tuning is
``prefix-serve train`` itself; the others are ``bench.quality.baseline_training``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# How the trained result is served: a task on the shared base model (a prefix, soft prompt or LoRA: one
# server for all of them), its own model folder (a server of its own), or no training at all (the base
# model prompted).
Served = Literal["task", "model", "prompted"]

# Instruction for the prompted base model, and the text that prefix and prompt tuning start from
# (real-word initialisation, Li & Liang §7.2): the same words for both.
INSTRUCTION = "Write one sentence about the restaurant that uses every attribute of the data."
NUM_VIRTUAL_TOKENS = 10  # the paper's E2E prefix length; 115,200 parameters (0.086%) on SmolLM2-135M
LORA_RANK = 8


@dataclass(frozen=True)
class Method:
    name: str  # id in task ids, folders and the report
    label: str  # the table's name for it
    served: Served
    lr: float = 0.0  # peak AdamW learning rate (0: not trained)
    upload: str = "prefix.safetensors"  # a task's file or folder in the training output, uploaded as it is

    def train_command(self, model: str, data: Path, out: Path, *, epochs: int, batch_size: int) -> list[str]:
        """The command that trains this method into ``out`` (``served`` says what it leaves there)."""
        common = ["--model", model, "--data", str(data), "--out", str(out), "--epochs", str(epochs)]
        common += ["--lr", str(self.lr), "--batch-size", str(batch_size)]
        if self.name.startswith("prefix"):
            command = [sys.executable, "-m", "server.cli", "train", *common, "--no-progress"]
            command += ["--num-virtual-tokens", str(NUM_VIRTUAL_TOKENS), "--init-text", INSTRUCTION]
            return command + (["--prefix-projection"] if self.name == "prefix-mlp" else [])
        command = [sys.executable, "-m", "bench.quality.baseline_training", "--method", self.name, *common]
        if self.name == "prompt-tuning":
            command += ["--num-virtual-tokens", str(NUM_VIRTUAL_TOKENS), "--init-text", INSTRUCTION]
        return command + (["--lora-rank", str(LORA_RANK)] if self.name == "lora" else [])


METHODS = (
    Method("prompted", "base model, instruction + 3 examples", "prompted"),
    Method("prompt-tuning", "PEFT prompt tuning (10 tokens)", "task", lr=3e-2),
    Method("prefix", "prefix-tuning, prefix-serve train (10 tokens)", "task", lr=5e-2),
    Method("prefix-mlp", "prefix-tuning + MLP (--prefix-projection)", "task", lr=5e-4),
    Method("lora", f"PEFT LoRA (r={LORA_RANK}, q/k/v/o)", "task", lr=1e-3, upload="peft"),
    Method("full", "full fine-tuning", "model", lr=5e-5),
)
