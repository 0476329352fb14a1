"""What a PEFT user would serve with: the base model with PEFT's prefix cache (``get_prompt``), a
KV-cached greedy decode, one batch at a time; either one request per batch or one batch per task (the
best PEFT allows, since one PEFT forward takes one prefix)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from prefix_store.prefix import Prefix
from server.benchmark.loops import Event
from server.engine.request import GenerationRequest


def peft_tasks(model: PreTrainedModel, lengths: Sequence[int]) -> tuple[dict[str, object], dict[str, Prefix]]:
    """One PEFT prefix-tuning model per length over the same base (``task0``, ``task1``, ...), and the
    same prefixes in the engine's form (``[layers, kv_heads, P, head_dim]``)."""
    from peft import PrefixTuningConfig, get_peft_model  # a benchmark extra, not a serving dependency

    peft_models, prefixes = {}, {}
    for i, length in enumerate(lengths):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(
            model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
        )
        peft_model.prompt_encoder.to(model.device)
        peft_model.eval()
        cache = peft_model.get_prompt(batch_size=1)
        prefixes[f"task{i}"] = Prefix(
            keys=torch.stack([layer.keys[0] for layer in cache.layers]).contiguous(),  # [L, H, P, D]
            values=torch.stack([layer.values[0] for layer in cache.layers]).contiguous(),
        ).to(model.device, model.dtype)
        peft_models[f"task{i}"] = peft_model
    return peft_models, prefixes


class BatchAtATime:
    """A ``System`` (see ``loops``) as a PEFT user runs one: each ``advance`` runs batches to completion,
    one request each, or (``grouped``) one batch per task of everything queued (one PEFT forward takes one
    prefix). Subclasses run a batch (``_run_batch``)."""

    def __init__(self, *, grouped: bool) -> None:
        self.grouped = grouped
        self.queue: deque[GenerationRequest] = deque()

    def submit(self, request: GenerationRequest) -> None:
        self.queue.append(request)

    def advance(self) -> list[Event]:
        if not self.grouped:
            return self._run_batch([self.queue.popleft()])
        by_task: dict[str | None, list[GenerationRequest]] = defaultdict(list)
        while self.queue:
            request = self.queue.popleft()
            by_task[request.task_id].append(request)
        return [event for group in by_task.values() for event in self._run_batch(group)]

    def _run_batch(self, group: list[GenerationRequest]) -> list[Event]:
        raise NotImplementedError


class PeftSystem(BatchAtATime):
    """A decoder-only model with PEFT's prefix cache (``get_prompt``) and a KV-cached greedy decode."""

    def __init__(self, model: PreTrainedModel, peft_models: dict[str, object], *, grouped: bool) -> None:
        super().__init__(grouped=grouped)
        self.model, self.peft_models = model, peft_models

    @torch.inference_mode()
    def _run_batch(self, group: list[GenerationRequest]) -> list[Event]:
        peft_model = self.peft_models[group[0].task_id]
        batch_size, longest = len(group), max(len(r.prompt_ids) for r in group)
        cache: DynamicCache = peft_model.get_prompt(batch_size=batch_size)
        prefix_length = cache.get_seq_length()
        device = self.model.device
        input_ids = torch.zeros(batch_size, longest, dtype=torch.long, device=device)  # [B, T]
        mask = torch.zeros(batch_size, prefix_length + longest, dtype=torch.long, device=device)  # [B, P + T]
        mask[:, :prefix_length] = 1
        for i, r in enumerate(group):  # left padding, as a PEFT user batches prompts
            input_ids[i, longest - len(r.prompt_ids) :] = torch.tensor(list(r.prompt_ids))
            mask[i, prefix_length + longest - len(r.prompt_ids) :] = 1
        for _ in range(max(r.max_new_tokens for r in group)):
            out = self.model(
                input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1
            )
            cache = out.cache
            input_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.long, device=device)], dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return [(r.request_id, r.max_new_tokens, True) for r in group]
