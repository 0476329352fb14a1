"""The quality benchmark's pure parts: the synthetic E2E data set, its slot checker and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality.e2e_data import (
    ATTRIBUTES,
    TEST_ONLY,
    TEST_REFERENCES,
    Example,
    Splits,
    build_splits,
    few_shot_examples,
    make_mr,
    prompt_text,
    realized_slots,
    render,
    write_jsonl,
)
from bench.quality.metrics import corpus_bleu, slot_coverage
from server.training.data import read_records

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module", params=SEEDS)
def splits(request: pytest.FixtureRequest) -> Splits:
    return build_splits(request.param)


def _keys(example: Example) -> tuple[str, ...]:
    return tuple(key for key, _ in example.mr)


def test_splits_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    assert build_splits(0) == build_splits(0)
    assert build_splits(0).full != build_splits(1).full
    assert build_splits(0).test != build_splits(1).test


def test_sizes_and_low_is_the_head_of_full() -> None:
    splits = build_splits(3, full_size=100, low_size=10, test_size=20)
    assert (len(splits.full), len(splits.low), len(splits.test)) == (100, 10, 20)
    assert splits.low == splits.full[:10]
    default = build_splits()
    assert (len(default.full), len(default.low), len(default.test)) == (480, 48, 64)
    with pytest.raises(ValueError):
        build_splits(0, full_size=10, low_size=11)


def test_mrs_are_well_formed_and_distinct(splits: Splits) -> None:
    mrs = [example.mr for example in (*splits.full, *splits.test)]
    assert len(set(mrs)) == len(mrs)
    for mr in mrs:
        assert make_mr(mr) == mr  # known values, in attribute order
        assert mr[0][0] == "name" and 3 <= len(mr) <= 6


def test_held_out_values_occur_only_in_test(splits: Splits) -> None:
    for key, held_out in TEST_ONLY.items():
        train_values = {dict(example.mr).get(key) for example in splits.full}
        test_values = {dict(example.mr).get(key) for example in splits.test}
        assert train_values.isdisjoint(held_out), key
        assert set(held_out) <= test_values, key
    assert any(dict(example.mr).get("food") == "Japanese" for example in splits.test)


def test_test_mrs_and_some_key_sets_are_unseen_in_training(splits: Splits) -> None:
    train_mrs = {example.mr for example in splits.full}
    assert all(example.mr not in train_mrs for example in splits.test)
    train_keys = {_keys(example) for example in splits.full}
    unseen = [example for example in splits.test if _keys(example) not in train_keys]
    assert len(unseen) >= len(splits.test) // 4


def test_references_are_distinct_and_realise_every_slot(splits: Splits) -> None:
    assert all(len(set(example.references)) >= 3 for example in splits.test)
    assert all(len(example.references) == TEST_REFERENCES for example in splits.test)
    for example in (*splits.full, *splits.test):
        for reference in example.references:
            assert all(realized_slots(example.mr, reference).values()), (example.mr_text, reference)


def test_render_and_prompt() -> None:
    mr = make_mr({"near": "Burger King", "name": "The Eagle", "food": "French", "eatType": "coffee shop"})
    assert render(mr) == "name[The Eagle], eatType[coffee shop], food[French], near[Burger King]"
    assert prompt_text(mr) == f"Data: {render(mr)}\nSentence:"
    example = Example(mr=mr, references=("The Eagle is a French coffee shop near Burger King.",))
    assert example.prompt == prompt_text(mr) and example.mr_text == render(mr)
    assert example.completion == " The Eagle is a French coffee shop near Burger King."
    with pytest.raises(ValueError):
        make_mr({"food": "French"})
    with pytest.raises(ValueError):
        make_mr({"name": "The Eagle", "food": "Martian"})


def test_checker_notices_a_dropped_slot() -> None:
    mr = make_mr({"name": "The Eagle", "eatType": "pub", "area": "riverside", "near": "Burger King"})
    assert all(realized_slots(mr, "The Eagle is a pub by the riverside near Burger King.").values())
    assert realized_slots(mr, "The Eagle is a pub near Burger King.") == {
        "name": True,
        "eatType": True,
        "area": False,
        "near": True,
    }
    assert not realized_slots(mr, "Aromi is a pub by the riverside near Burger King.")["name"]
    assert not realized_slots(mr, "The Eagle is a public house by the riverside.")["eatType"]


def test_checker_handles_negated_family_friendliness() -> None:
    yes = make_mr({"name": "Zizzi", "familyFriendly": "yes"})
    no = make_mr({"name": "Zizzi", "familyFriendly": "no"})
    for text in ("Zizzi is not family-friendly.", "Zizzi isn't kid friendly.", "Zizzi is adults only."):
        assert realized_slots(no, text)["familyFriendly"], text
        assert not realized_slots(yes, text)["familyFriendly"], text
    for text in ("Zizzi is family friendly.", "Zizzi welcomes children."):
        assert realized_slots(yes, text)["familyFriendly"], text
        assert not realized_slots(no, text)["familyFriendly"], text
    assert not realized_slots(yes, "Zizzi does not welcome children.")["familyFriendly"]
    assert not realized_slots(no, "Zizzi is a pub.")["familyFriendly"]


def test_checker_keeps_price_and_rating_apart() -> None:
    mr = make_mr({"name": "Cotto", "priceRange": "high", "customerRating": "low"})
    assert realized_slots(mr, "Cotto has a high customer rating.")["priceRange"] is False
    assert realized_slots(mr, "Cotto has a low price range.")["customerRating"] is False
    assert realized_slots(mr, "Cotto is inexpensive.")["priceRange"] is False
    assert all(realized_slots(mr, "Cotto is expensive and is rated low by customers.").values())


def test_checker_ignores_the_landmark_when_checking_food() -> None:
    mr = make_mr({"name": "Cotto", "food": "Indian", "near": "Raja Indian Cuisine"})
    assert realized_slots(mr, "Cotto is near Raja Indian Cuisine.") == {
        "name": True,
        "food": False,
        "near": True,
    }
    assert realized_slots(mr, "Cotto serves Indian food near Raja Indian Cuisine.")["food"]


def test_bleu_of_references_against_themselves_and_of_unrelated_text(splits: Splits) -> None:
    references = [example.references for example in splits.test]
    assert corpus_bleu([refs[0] for refs in references], references) == pytest.approx(100.0)
    unrelated = ["Quantum chromodynamics describes quarks and gluons."] * len(references)
    assert corpus_bleu(unrelated, references) < 5.0
    # unequal reference counts are padded, not rejected
    assert corpus_bleu(["a b c d e", "f g h i j"], [["a b c d e"], ["x y", "f g h i j"]]) == pytest.approx(
        100.0
    )
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        corpus_bleu(["a"], ["a"])  # a bare string is not a list of references


def test_slot_coverage_on_a_hand_built_case() -> None:
    first = Example(make_mr({"name": "Aromi", "eatType": "pub", "area": "riverside"}), ("-",))
    second = Example(make_mr({"name": "Zizzi", "food": "French", "familyFriendly": "no"}), ("-",))
    coverage = slot_coverage(
        [first, second],
        ["Aromi is a pub by the riverside.", "Zizzi serves French food and is family-friendly."],
    )
    assert coverage.slot_recall == pytest.approx(5 / 6)
    assert coverage.exact == pytest.approx(1 / 2)
    assert coverage.per_attribute == {
        "name": 1.0,
        "eatType": 1.0,
        "food": 1.0,
        "area": 1.0,
        "familyFriendly": 0.0,
    }
    with pytest.raises(ValueError):
        slot_coverage([first], [])


def test_jsonl_is_what_the_trainer_reads(tmp_path: Path) -> None:
    splits = build_splits(0, full_size=20, low_size=5, test_size=8)
    train = write_jsonl(splits.full, tmp_path / "train.jsonl")
    records = read_records(train).records
    assert [(r.prompt, r.completion) for r in records] == [(e.prompt, e.completion) for e in splits.full]
    assert all(r.completion.startswith(" ") and r.prompt.endswith("Sentence:") for r in records)
    test = write_jsonl(splits.test, tmp_path / "test.jsonl", all_references=True)
    assert len(read_records(test).records) == len(splits.test)
    lines = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    assert [line["references"] for line in lines] == [list(e.references) for e in splits.test]
    assert [make_mr(line["mr"]) for line in lines] == [e.mr for e in splits.test]
    assert "references" not in json.loads(train.read_text(encoding="utf-8").splitlines()[0])


def test_few_shot_examples_are_deterministic_training_examples() -> None:
    splits = build_splits(0)
    shots = few_shot_examples(splits, k=3)
    assert shots == few_shot_examples(build_splits(0), k=3)
    assert len(shots) == 3 and len(set(shots)) == 3
    assert all(shot in splits.low for shot in shots)
    assert {key for shot in shots for key, _ in shot.mr} == set(ATTRIBUTES)  # every attribute shown
