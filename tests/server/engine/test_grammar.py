"""Structured output: a row constrained by a JSON schema writes a document that validates, in a mixed batch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.grammar import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, GrammarCompiler, GrammarError
from server.engine.lifecycle import FinishReason
from tests.server.engine.helpers import random_prefix, request

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "digit": {"type": "integer", "minimum": 0, "maximum": 9},
        "kind": {"enum": ["a", "bb", "ccc"]},
    },
    "required": ["ok", "digit", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(base: BaseModel) -> GrammarCompiler:
    return GrammarCompiler(base.tokenizer, base.eos_token_ids)


def test_a_constrained_row_writes_a_valid_document_and_its_neighbours_do_not_notice(
    base: BaseModel, compiler: GrammarCompiler
) -> None:
    grammar = compiler.json_schema(SCHEMA, scope="tenant-a")
    constrained = replace(
        request(base, "json", "Answer in JSON:", random_prefix(base, 5, 1), max_new_tokens=60),
        grammar=grammar,
    )
    plain = request(base, "plain", "Answer in JSON:", max_new_tokens=12)
    results = generate(base, [constrained, plain])
    document = json.loads(results[0].text)
    assert set(document) == {"ok", "digit", "kind"} and isinstance(document["ok"], bool)
    assert document["digit"] in range(10) and document["kind"] in ("a", "bb", "ccc")
    assert results[0].finish_reason in (FinishReason.STOP, FinishReason.EOS)
    assert results[1].token_ids == generate(base, [plain])[0].token_ids  # rows without one pay nothing
    unconstrained = generate(base, [replace(constrained, grammar=None)])[0]
    assert unconstrained.text != results[0].text  # the grammar did the work, not the model


def test_compiled_grammars_are_cached_per_scope(compiler: GrammarCompiler) -> None:
    first = compiler.json_schema(SCHEMA, scope="tenant-a")
    assert compiler.json_schema(dict(reversed(list(SCHEMA.items()))), scope="tenant-a") is first
    assert compiler.json_schema(SCHEMA, scope="tenant-b") is not first


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_heavy_but_valid_patterns_compile_at_once(base: BaseModel, compiler: GrammarCompiler) -> None:
    """llguidance builds lexers lazily under fuel limits: a pattern that explodes a DFA costs nothing up
    front. The compiler checks every grammar under those limits (a bound on work, not on time), so an
    eager build would be refused with ``GrammarError``; the compiled grammar then starts a row at once."""
    grammar = compiler.json_schema({"type": "string", "pattern": "(((a|b)*c)*d){5000}"}, scope="heavy")
    matcher = grammar.matcher()
    allowed = matcher.allowed(len(base.tokenizer), torch.device("cpu"))
    assert matcher.failed is None and allowed[base.tokenizer.convert_tokens_to_ids('"')]  # a string opens


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}},
        {"type": 12},
        {"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)},
        _nested(MAX_SCHEMA_DEPTH + 1),
        _nested(5000),  # deeper than Python's recursion limit: still a clean refusal
    ],
    ids=["bad-pattern", "not-a-schema", "too-large", "too-deep", "far-too-deep"],
)
def test_schemas_that_cannot_be_used_are_refused(compiler: GrammarCompiler, schema: dict) -> None:
    with pytest.raises(GrammarError):
        compiler.json_schema(schema)
