"""Structured output: a JSON schema compiled into a grammar that constrains a row's tokens, with llguidance.

llguidance (the Rust library behind Guidance, also a vLLM and llama.cpp back end) was picked over xgrammar
for two reasons: it builds a grammar lazily, with fuel limits on every step, so a hostile schema cannot
make compilation or a decode step take unbounded time (its parser limits are enforced inside the
library); and it needs no other package (xgrammar needs triton on Linux and compiles its torch kernels).

A ``Grammar`` is a compiled, immutable constraint (cache it, share it between rows); each row gets a
``GrammarMatcher`` of its own that says which tokens may come next and follows the tokens picked. A
schema is untrusted input: ``GrammarCompiler.json_schema`` bounds its size and refuses what llguidance
cannot compile with ``GrammarError`` (the API answers 400).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from prefix_store.storage.excerpt import excerpt

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in the schema document
MAX_SCHEMA_PATTERNS = 64  # distinct regexes (each is checked on its own before the schema is used)
_CACHE_ENTRIES = 256
_LIMITS = dict(max_grammar_size=100_000, step_max_items=50_000, initial_lexer_fuel=1_000_000)


class GrammarError(ValueError):
    """A schema that cannot be used: too large, not JSON, or one llguidance refuses."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint (a llguidance grammar for one tokenizer)."""

    text: str  # llguidance's grammar, from the schema
    tokenizer: llguidance.LLTokenizer

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(self.tokenizer, self.text, limits=_limits(), log_level=0))


class GrammarMatcher:
    """One row's position in its grammar. Its next mask may be computed ahead, on a worker thread
    (``prefetch``: llguidance drops the GIL), so that a costly grammar holds only its own row."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self._next: Future[torch.Tensor] | None = None

    def prefetch(self, executor: Executor, vocab_size: int, device: torch.device) -> None:
        """Start computing the next mask (``allowed`` then returns it)."""
        self._next = executor.submit(self._allowed, vocab_size, device)

    @property
    def ready(self) -> bool:
        """Whether ``allowed`` answers without waiting for a mask being computed."""
        return self._next is None or self._next.done()

    @property
    def pending(self) -> Future[torch.Tensor] | None:
        """The mask being computed ahead, if any."""
        return self._next

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """``[vocab_size]`` bool: the tokens that may come next (the prefetched mask, if there is one)."""
        if self._next is not None:
            mask, self._next = self._next.result(), None
            return mask
        return self._allowed(vocab_size, device)

    def _allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)  # [W]
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
        allowed = bits.flatten().bool()
        if allowed.numel() < vocab_size:  # ids the tokenizer does not know (a padded vocabulary)
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.numel())])
        return allowed[:vocab_size].to(device)

    def allowed_ids(self) -> list[int]:
        """The token ids that may come next (for checks; the engine uses ``allowed``)."""
        mask = self._matcher.compute_logit_bias()  # one byte per token: non-zero where allowed
        return [token for token, allowed in enumerate(mask) if allowed]

    def accept(self, token_id: int) -> None:
        """Follow the token picked (one the mask allowed)."""
        self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Whether the grammar allows nothing more (the document is complete)."""
        return self._matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        """Why the matcher can go no further (a limit was hit), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles schemas for one tokenizer (its llguidance view is built once, on first use: ~1 s) and keeps
    the last compiled grammars, by cache key (the caller scopes it, e.g. per tenant)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer, self._eos = tokenizer, sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def json_schema(self, schema: dict[str, Any], *, scope: str = "") -> Grammar:
        """A grammar for JSON documents that validate against ``schema`` (``{"type": "object"}``: any
        object). Raises ``GrammarError``."""
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        text = json.dumps(schema, sort_keys=True)
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
        key = (scope, text)
        with self._lock:
            if (cached := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return cached
        tokenizer = self._llg_tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False}
            )
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=_limits())
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the JSON schema cannot be used: {error[:500]}")
        compiled = Grammar(grammar, tokenizer)
        _check_start(compiled)
        patterns = set(_patterns(schema))
        if len(patterns) > MAX_SCHEMA_PATTERNS:
            raise GrammarError(
                f"the JSON schema has {len(patterns)} regex patterns, over the limit of {MAX_SCHEMA_PATTERNS}"
            )
        for pattern in patterns:
            self._check_pattern(pattern)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _check_pattern(self, pattern: str) -> None:
        """A ``pattern`` llguidance takes but cannot use: a trailing escape (read as a literal backslash), or
        a regex whose automaton is built lazily and goes over its limits at the string's first character
        (``a{1000000}``), which would otherwise fail mid-generation. Raises ``GrammarError``."""
        if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
            raise GrammarError(
                f"the pattern {excerpt(pattern)} is not a valid regex: it ends with a lone '\\'"
            )
        string = Grammar(
            llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "pattern": pattern})),
            self._llg_tokenizer(),
        ).matcher()
        opening = string.allowed_ids()  # the opening quote
        if opening:
            string.accept(opening[0])
            string.allowed_ids()
        if string.failed is not None:
            reason = string.failed.splitlines()[0]
            raise GrammarError(f"the pattern {excerpt(pattern)} cannot be used: {reason[:200]}")

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, eos_token=self._eos or None
                )
            return self._tokenizer


def _check_start(grammar: Grammar) -> None:
    """The grammar admits a document: a schema that can match nothing (``{"$ref": "#"}``, a ``$ref`` cycle)
    compiles, then stops before its first token, which would answer an empty, invalid document."""
    matcher = grammar.matcher()
    if not matcher.allowed_ids() or matcher.failed is not None or matcher.done:
        raise GrammarError("the JSON schema admits no document (a $ref that refers only to itself?)")


def _patterns(schema: Any) -> list[str]:
    """Every regex in ``schema``: ``pattern`` values and ``patternProperties`` keys (iteratively)."""
    found, pending = [], [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                found.extend(node["patternProperties"])
            pending.extend(node.values())
    return found


def _depth(document: Any) -> int:
    """How deeply ``document``'s objects and arrays nest (iteratively: a hostile document may be deep)."""
    deepest, pending = 0, [(document, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_SCHEMA_DEPTH:
                break
            children = node.values() if isinstance(node, dict) else node
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**_LIMITS)
