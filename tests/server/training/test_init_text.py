"""``--init-text``: the prefix is the frozen model's own K/V of the text, so prefix + prompt = text + prompt."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.cache_utils import DynamicCache

from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.training.init_text import init_text_token_ids, prefix_from_text
from tests.server.engine.helpers import request

TEXT = "Summarize the following text in one sentence:"
PROMPT = " the weather today is sunny"


def test_the_prefix_is_the_models_own_cache_of_the_text(base: BaseModel) -> None:
    ids = init_text_token_ids(base.tokenizer, TEXT, None)
    prefix = prefix_from_text(base, ids)
    assert prefix.fits(base.geometry) and prefix.num_virtual_tokens == len(ids)
    cache = DynamicCache()
    with torch.no_grad():
        base.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)  # plain Hugging Face forward
    for layer in range(base.geometry.num_layers):
        torch.testing.assert_close(prefix.keys[layer], cache.layers[layer].keys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix.values[layer], cache.layers[layer].values[0], rtol=1e-5, atol=1e-5)


def test_serving_the_text_prefix_equals_prepending_the_text(base: BaseModel) -> None:
    ids = init_text_token_ids(base.tokenizer, TEXT, None)
    prefix = prefix_from_text(base, ids)
    with_prefix = generate(base, [request(base, "a", PROMPT, prefix, max_new_tokens=10)])[0].token_ids
    prompt_ids = base.tokenizer(PROMPT).input_ids
    bare = request(base, "b", PROMPT, None, max_new_tokens=10)
    as_text = generate(base, [replace(bare, prompt_ids=ids + list(prompt_ids))])[0].token_ids
    assert with_prefix == as_text


def test_the_text_is_repeated_or_cut_to_the_prefix_length(llama_base: BaseModel) -> None:
    ids = init_text_token_ids(llama_base.tokenizer, "hello", None)
    assert init_text_token_ids(llama_base.tokenizer, "hello", 2 * len(ids) + 1) == ids * 2 + ids[:1]
    assert (
        init_text_token_ids(llama_base.tokenizer, TEXT, 2)
        == init_text_token_ids(llama_base.tokenizer, TEXT, None)[:2]
    )
