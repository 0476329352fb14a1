"""Per-row sampling: greedy, top-k, top-p, temperature and seeds, vectorised over a batch."""

from __future__ import annotations

import torch

from server.engine.sampling import SamplingParams, sample_next_tokens


def _draw(logits: torch.Tensor, params: SamplingParams, steps: int) -> list[int]:
    generator = params.new_generator(logits.device)
    return [int(sample_next_tokens(logits[None], [params], [generator])[0]) for _ in range(steps)]


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 4
    assert params[0].new_generator(torch.device("cpu")) is None
    assert torch.equal(sample_next_tokens(logits, params, [None] * 4), logits.argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    first, second = _draw(LOGITS, params, 40), _draw(LOGITS, params, 40)
    assert first == second
    assert _draw(LOGITS, SamplingParams(temperature=1.0, seed=43), 40) != first


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(_draw(LOGITS, SamplingParams(temperature=5.0, top_k=2, seed=1), 200)) == {0, 1}
    # probabilities at T=1: ~[0.57, 0.21, 0.13, 0.08, 0.03, 0.004]; the nucleus for p=0.8 is {0, 1, 2}
    assert set(_draw(LOGITS, SamplingParams(temperature=1.0, top_p=0.8, seed=2), 400)) == {0, 1, 2}
    assert set(_draw(LOGITS, SamplingParams(temperature=1.0, top_p=0.01, seed=3), 50)) == {0}


def test_frequencies_follow_the_softmax() -> None:
    draws = _draw(LOGITS, SamplingParams(temperature=1.0, seed=7), 3000)
    expected = LOGITS.softmax(-1)
    observed = torch.bincount(torch.tensor(draws), minlength=6).float() / len(draws)
    assert torch.allclose(observed, expected, atol=0.03)


def test_low_temperature_concentrates_high_temperature_spreads() -> None:
    cold = _draw(LOGITS, SamplingParams(temperature=0.05, seed=5), 100)
    hot = _draw(LOGITS, SamplingParams(temperature=50.0, seed=5), 300)
    assert set(cold) == {0}
    assert len(set(hot)) == 6


def test_rows_are_independent_of_their_neighbours() -> None:
    """A seeded row draws the same tokens whether it samples alone or beside greedy and other rows."""
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = _draw(LOGITS, seeded, 30)
    logits = torch.stack([torch.randn(6), LOGITS, torch.randn(6)])
    params = [SamplingParams(), seeded, SamplingParams(temperature=0.7, seed=99)]
    generators = [p.new_generator(torch.device("cpu")) for p in params]
    together = [int(sample_next_tokens(logits, params, generators)[1]) for _ in range(30)]
    assert together == alone
