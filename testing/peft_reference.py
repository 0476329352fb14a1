"""PEFT as the reference implementation of prefix tuning, soft prompts and LoRA, for tests of any Hugging
Face causal LM.

Stock ``PeftModel.generate`` silently ignores prefix-tuning adapters with transformers 5.24 (it passes
its own empty cache; the prefix PEFT passes under the deprecated ``past_key_values`` name is dropped),
so the reference decoder is a greedy loop over ``PeftModelForCausalLM.forward`` with full recompute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


def make_peft_adapter(
    base_model: PreTrainedModel,
    out_dir: Path,
    *,
    num_virtual_tokens: int,
    prefix_projection: bool = False,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised PEFT ``PREFIX_TUNING`` adapter for ``base_model`` into ``out_dir``
    (``SEQ_2_SEQ_LM`` for an encoder-decoder model, else ``CAUSAL_LM``).

    The initialisation depends on ``seed`` only (the global RNG is left as it was). With
    ``prefix_projection`` the saved prefix is the reparameterisation MLP's output (PEFT initialises
    the MLP randomly, not to zero). PEFT freezes ``base_model``'s parameters (``requires_grad=False``)
    but changes none of its weights, so the same model can serve as the base of the adapter afterwards.
    """
    config = PrefixTuningConfig(
        task_type=_task_type(base_model),
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base_model, config)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def make_peft_soft_prompt(
    base_model: PreTrainedModel,
    out_dir: Path,
    *,
    num_virtual_tokens: int,
    method: str = "PROMPT_TUNING",
    seed: int = 0,
) -> Path:
    """Save a randomly initialised PEFT soft-prompt adapter (``PROMPT_TUNING``, or ``P_TUNING`` with its MLP
    prompt encoder, which PEFT saves as the encoder's output) for ``base_model`` into ``out_dir``; seeded
    and typed like ``make_peft_adapter``."""
    task_type = _task_type(base_model)
    configs = {
        "PROMPT_TUNING": lambda: PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=num_virtual_tokens
        ),
        "P_TUNING": lambda: PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=32
        ),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base_model, configs[method]())
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def make_peft_lora(
    base_model: PreTrainedModel,
    out_dir: Path,
    *,
    target_modules: list[str] | str,
    r: int = 8,
    lora_alpha: float = 16,
    seed: int = 0,
    scale: float = 0.3,
    **options: object,
) -> Path:
    """Save a PEFT ``LORA`` adapter for ``base_model`` into ``out_dir`` with random ``A`` and ``B`` (PEFT
    starts ``B`` at zero, an update of nothing: here both are drawn, times ``scale``, so the task changes
    the tokens). ``options`` go to ``LoraConfig`` (``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``fan_in_fan_out``, …). Seeded like ``make_peft_adapter``; the base model's weights are left as they
    were (PEFT wraps its modules: build the adapter on a copy you do not need afterwards)."""
    options.setdefault("fan_in_fan_out", any(isinstance(m, Conv1D) for m in base_model.modules()))
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, target_modules=target_modules, **options
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base_model, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    parameter.copy_(torch.randn_like(parameter) * scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def _task_type(model: PreTrainedModel) -> str:
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


def peft_greedy_tokens(
    peft_model: PeftModel, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None
) -> list[int]:
    """The greedy continuation of ``prompt_ids`` under ``peft_model`` (new tokens only).

    Every step recomputes the whole sequence through ``peft_model.forward``, which puts the prefix in
    the cache itself. Stops early after ``eos_token_id`` (included) when given. The model must be in
    eval mode (dropout would make the reference random).
    """
    if peft_model.training:
        raise ValueError("peft_greedy_tokens needs a model in eval mode")
    device = next(peft_model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    new_tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = peft_model(input_ids=ids).logits[:, -1]  # [1, vocab]
            next_id = int(logits.argmax(dim=-1))
            new_tokens.append(next_id)
            if next_id == eos_token_id:
                break
            ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
    return new_tokens


def peft_seq2seq_greedy_tokens(
    peft_model: PeftModel, source_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None
) -> list[int]:
    """The greedy decoding of ``source_ids`` under an encoder-decoder ``peft_model`` (or a plain model):
    every step recomputes encoder and decoder through ``forward`` from the decoder start token (PEFT puts
    its prefix in the decoder's cache itself). Stops early after ``eos_token_id`` (included) when given.
    The model must be in eval mode."""
    if peft_model.training:
        raise ValueError("peft_seq2seq_greedy_tokens needs a model in eval mode")
    device = next(peft_model.parameters()).device
    source = torch.tensor([source_ids], device=device)  # [1, S]
    decoded = [peft_model.config.decoder_start_token_id]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = peft_model(
                input_ids=source,
                attention_mask=torch.ones_like(source),
                decoder_input_ids=torch.tensor([decoded], device=device),
            ).logits  # [1, T, vocab]
            decoded.append(int(logits[0, -1].argmax()))
            if decoded[-1] == eos_token_id:
                break
    return decoded[1:]


def peft_logprobs(peft_model: PeftModel, token_ids: list[int]) -> torch.Tensor:
    """``[T, V]`` float32: the log-softmax PEFT's forward gives at each position of ``token_ids`` (row t
    is the distribution of the token after ``token_ids[t]``)."""
    device = next(peft_model.parameters()).device
    with torch.inference_mode():
        logits = peft_model(input_ids=torch.tensor([token_ids], device=device)).logits[0]
    return logits.float().log_softmax(dim=-1)
