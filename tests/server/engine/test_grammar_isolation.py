"""A grammar holds only its own row: a schema whose grammar goes over a limit mid-generation ends that row
(``GRAMMAR``, never an engine error) while the other rows go on to their solo tokens; and a row whose next
mask is still being computed sits steps out instead of holding the step, so the rows beside it finish
first. The masks are computed ahead on worker threads; here one is held back on purpose (a gate), which
the engine cannot tell from a slow grammar."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import llguidance
import torch

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.grammar import Grammar, GrammarCompiler, GrammarMatcher
from server.engine.lifecycle import FinishReason
from server.engine.scheduler import SchedulerConfig
from tests.server.engine.helpers import request

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def test_a_grammar_over_its_limits_mid_generation_ends_only_its_row(base: BaseModel) -> None:
    """The compiler refuses this pattern before admission; built directly, its grammar fails at the
    string's first character, as a schema past the compiler's checks still could."""
    tokenizer = GrammarCompiler(base.tokenizer, base.eos_token_ids).json_schema(SCHEMA).tokenizer
    text = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({"type": "string", "pattern": "^a{1000000}$"})
    )
    failing = replace(request(base, "bad", "Answer:", max_new_tokens=8), grammar=Grammar(text, tokenizer))
    plain = request(base, "plain", "Answer:", max_new_tokens=8)
    bad, good = generate(base, [failing, plain])
    assert bad.finish_reason is FinishReason.GRAMMAR and len(bad.token_ids) <= 1
    assert (
        good.token_ids == generate(base, [plain])[0].token_ids and good.finish_reason is FinishReason.LENGTH
    )


class _GatedMatcher(GrammarMatcher):
    """A real matcher whose masks wait for ``gate``: a mask that takes as long as a test wants."""

    def __init__(self, matcher: llguidance.LLMatcher, gate: threading.Event) -> None:
        super().__init__(matcher)
        self.gate = gate

    def _allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        assert self.gate.wait(60), "the gate was never opened"
        return super()._allowed(vocab_size, device)


class _GatedGrammar(Grammar):
    gate: threading.Event

    def matcher(self) -> GrammarMatcher:
        return _GatedMatcher(super().matcher()._matcher, self.gate)


def test_a_row_whose_mask_is_not_ready_does_not_hold_the_others(base: BaseModel) -> None:
    compiled = GrammarCompiler(base.tokenizer, base.eos_token_ids).json_schema(SCHEMA)
    grammar = _GatedGrammar(compiled.text, compiled.tokenizer)
    object.__setattr__(grammar, "gate", threading.Event())
    slow = replace(
        request(base, "slow", "Answer in JSON:", max_new_tokens=20, ignore_eos=False), grammar=grammar
    )
    plain = [request(base, f"plain{i}", f"Tell me {i}", max_new_tokens=12) for i in range(2)]
    core = EngineCore(base, SchedulerConfig(max_batch_size=4, max_batch_tokens=1 << 14))
    for one in (slow, *plain):
        core.add_request(one)
    tokens: dict[str, list[int]] = {one.request_id: [] for one in (slow, *plain)}
    ended: dict[str, FinishReason] = {}
    steps = 0
    while len(ended) < len(plain):  # the gate is shut: only the plain rows can move
        steps += 1
        assert steps < 200, "the plain rows did not finish"
        for output in core.step():
            tokens[output.request_id] += output.token_ids
            if output.finish_reason is not None:
                ended[output.request_id] = output.finish_reason
    assert "slow" not in ended and tokens["slow"] == []
    assert [tokens[one.request_id] for one in plain] == [r.token_ids for r in generate(base, plain)]
    grammar.gate.set()
    while "slow" not in ended:
        steps += 1
        assert steps < 400, "the constrained row did not finish once its masks came"
        for output in core.step():
            tokens[output.request_id] += output.token_ids
            if output.finish_reason is not None:
                ended[output.request_id] = output.finish_reason
    assert ended["slow"] in (FinishReason.STOP, FinishReason.EOS)
    assert json.loads(base.tokenizer.decode(tokens["slow"], skip_special_tokens=True))["ok"] in (True, False)
