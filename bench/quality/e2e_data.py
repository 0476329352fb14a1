"""A deterministic synthetic table-to-text data set in the spirit of the E2E NLG challenge (Novikova et al.,
2017), the data set of Li & Liang (2021)'s table-to-text experiment, in miniature.

A meaning representation (MR) is a restaurant's name plus 2–5 of the other seven E2E attributes, rendered
``name[The Eagle], eatType[coffee shop], food[French], near[Burger King]``. A template realiser writes the
references from one lexicon table (``LEXICON``); the slot checker (``realized_slots``) reads the same
table, so whatever the realiser writes, the checker recognises.

The test split measures extrapolation, as the E2E test set does: some names, some ``near`` landmarks and
the food "Japanese" occur only in test MRs, a few attribute sets (which keys are present) occur only in
test MRs, and no test MR equals a training MR. Everything is drawn from one ``random.Random(seed)``.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MR = tuple[tuple[str, str], ...]  # (attribute, value) pairs in ATTRIBUTES order; "name" always first

ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customerRating", "area", "familyFriendly", "near")
NAMES = (
    "The Eagle", "Aromi", "Zizzi", "The Punter", "Blue Spice", "Fitzbillies", "Alimentum", "Cotto",
    "Giraffe", "Wildwood", "Loch Fyne", "The Mill", "Bibimbap House", "Browns Cambridge", "Clowns", "Cocum",
    "Strada", "The Cricketers", "The Golden Curry", "The Phoenix", "The Plough", "The Rice Boat",
    "The Vaults", "The Waterman",
)  # fmt: skip
LANDMARKS = (
    "Burger King", "Café Rouge", "the Rainbow Vegetarian Café", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Raja Indian Cuisine", "The Sorrento", "Avalon", "Yippee Noodle Bar", "The Six Bells", "All Bar One", "Ranch",
)  # fmt: skip
FOODS = ("English", "French", "Italian", "Chinese", "Indian", "Japanese", "fast food")
VALUES: Mapping[str, tuple[str, ...]] = {
    "name": NAMES,
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": FOODS,
    "priceRange": ("cheap", "moderate", "high"),
    "customerRating": ("low", "average", "high"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
    "near": LANDMARKS,
}
# Values that occur in test MRs only, and the share of test MRs holding the attribute that take one.
TEST_ONLY: Mapping[str, tuple[str, ...]] = {
    "name": ("Cocum", "Strada", "The Cricketers", "The Phoenix", "The Vaults", "Wildwood"),
    "near": ("Avalon", "The Six Bells", "Ranch"),
    "food": ("Japanese",),
}
UNSEEN_SHARE: Mapping[str, float] = {"name": 0.5, "near": 0.5, "food": 0.25}
TEST_ONLY_KEY_SETS = 16  # of the 112 possible attribute sets, this many occur in test MRs only
UNSEEN_KEYS_EVERY = 4  # every 4th test MR takes one of them
TRAIN_REFERENCES = 1
TEST_REFERENCES = 5


@dataclass(frozen=True)
class Surface:
    """How one attribute value is written. ``forms`` are what the slot checker looks for (every phrase the
    realiser writes holds one of them); the other fields are the realiser's phrases, by grammatical role."""

    forms: tuple[str, ...]
    nouns: tuple[str, ...] = ()  # heads the noun phrase: "a cheap French {noun}"
    adjectives: tuple[str, ...] = ()  # before the noun
    verb_phrases: tuple[str, ...] = ()  # after the subject: "The Eagle {verb phrase}"
    locatives: tuple[str, ...] = ()  # after the noun, or as "is {locative}"


def _lexicon() -> dict[tuple[str, str], Surface]:
    table = {("name", name): Surface(forms=(name,)) for name in NAMES}
    table |= {
        ("near", place): Surface(
            forms=(place,), locatives=(f"near {place}", f"close to {place}", f"not far from {place}")
        )
        for place in LANDMARKS
    }
    table |= {
        ("food", food): Surface(
            forms=(food,),
            adjectives=(food,),
            verb_phrases=(f"serves {food} food", f"offers {food} cuisine", f"serves {food} dishes"),
        )
        for food in FOODS
        if food != "fast food"
    }
    table["food", "fast food"] = Surface(
        forms=("fast food",),
        adjectives=("fast food",),
        verb_phrases=("serves fast food", "offers fast food", "sells fast food"),
    )
    return table | {
        ("eatType", "coffee shop"): Surface(
            forms=("coffee shop", "coffee house", "café", "cafe"),
            nouns=("coffee shop", "café", "coffee house"),
        ),
        ("eatType", "pub"): Surface(forms=("pub",), nouns=("pub",)),
        ("eatType", "restaurant"): Surface(forms=("restaurant",), nouns=("restaurant",)),
        ("priceRange", "cheap"): Surface(
            forms=("cheap", "low-priced", "low price", "low prices"),
            adjectives=("cheap", "low-priced"),
            verb_phrases=("is cheap", "has a low price range", "is low-priced"),
        ),
        ("priceRange", "moderate"): Surface(
            forms=("moderately priced", "moderate price", "moderate prices"),
            adjectives=("moderately priced",),
            verb_phrases=("is moderately priced", "has a moderate price range", "has moderate prices"),
        ),
        ("priceRange", "high"): Surface(
            forms=("expensive", "high-priced", "high price", "high prices"),
            adjectives=("expensive", "high-priced"),
            verb_phrases=("is expensive", "has a high price range", "is high-priced"),
        ),
        ("customerRating", "low"): Surface(
            forms=("low customer rating", "low rating", "rated low", "low-rated"),
            verb_phrases=("has a low customer rating", "is rated low by customers", "has a low rating"),
        ),
        ("customerRating", "average"): Surface(
            forms=("average customer rating", "average rating", "rated average", "averagely rated"),
            verb_phrases=(
                "has an average customer rating",
                "is rated average by customers",
                "has an average rating",
            ),
        ),
        ("customerRating", "high"): Surface(
            forms=("high customer rating", "high rating", "rated high", "rated highly", "highly rated"),
            verb_phrases=("has a high customer rating", "is rated highly by customers", "is highly rated"),
        ),
        ("area", "riverside"): Surface(
            forms=("riverside",), locatives=("by the riverside", "in the riverside area", "on the riverside")
        ),
        ("area", "city centre"): Surface(
            forms=("city centre", "city center", "centre of the city"),
            locatives=("in the city centre", "in the centre of the city", "in the heart of the city centre"),
        ),
        # "yes" is realised only where no "no" form is present (each "no" form holds a "yes" form or none)
        ("familyFriendly", "yes"): Surface(
            forms=("family-friendly", "kid friendly", "child-friendly", "welcomes children"),
            adjectives=("family-friendly", "kid friendly"),
            verb_phrases=("is family-friendly", "is kid friendly", "welcomes children"),
        ),
        ("familyFriendly", "no"): Surface(
            forms=(
                "not family-friendly",
                "not kid friendly",
                "not child-friendly",
                "not welcome children",
                "adults only",
            ),
            adjectives=("adults-only",),
            verb_phrases=(
                "is not family-friendly",
                "is not kid friendly",
                "does not welcome children",
                "is adults only",
            ),
        ),
    }


LEXICON: Mapping[tuple[str, str], Surface] = _lexicon()


def make_mr(slots: Mapping[str, str] | Iterable[tuple[str, str]]) -> MR:
    """An MR from a mapping or pairs, in ATTRIBUTES order; raises ``ValueError`` on an unknown attribute or
    value, or a missing name."""
    pairs = dict(slots.items() if isinstance(slots, Mapping) else slots)
    unknown = [f"{key}[{value}]" for key, value in pairs.items() if (key, value) not in LEXICON]
    if unknown or "name" not in pairs:
        raise ValueError(f"not an MR: unknown {unknown}" if unknown else "an MR needs a name")
    return tuple((key, pairs[key]) for key in ATTRIBUTES if key in pairs)


def render(mr: MR) -> str:
    """The MR as the E2E data set writes it: ``name[The Eagle], eatType[pub], near[Burger King]``."""
    return ", ".join(f"{key}[{value}]" for key, value in mr)


def prompt_text(mr: MR) -> str:
    """The prompt of every method: the rendered MR, then ``Sentence:`` (the completion starts with a space)."""
    return f"Data: {render(mr)}\nSentence:"


@dataclass(frozen=True)
class Example:
    """One MR and its references (a training example's completion is its first reference)."""

    mr: MR
    references: tuple[str, ...]

    @property
    def mr_text(self) -> str:
        return render(self.mr)

    @property
    def prompt(self) -> str:
        return prompt_text(self.mr)

    @property
    def completion(self) -> str:
        return " " + self.references[0]


@dataclass(frozen=True)
class Splits:
    """The training sets (``low`` is the first examples of ``full``: the same distribution) and the test set."""

    full: tuple[Example, ...]
    low: tuple[Example, ...]
    test: tuple[Example, ...]


# --- the realiser -------------------------------------------------------------------------------------

TEMPLATES = 4
_ROLE_ORDER = ("priceRange", "customerRating", "familyFriendly", "food", "area", "near")  # adjective order


def realise(mr: MR, rng: random.Random, template: int) -> str:
    """One English reference for ``mr``: template ``template % TEMPLATES``, phrases drawn from ``rng``."""
    slots = dict(mr)
    name = slots["name"]
    eat_type = slots.get("eatType")
    noun = rng.choice(LEXICON["eatType", eat_type].nouns if eat_type else ("place", "venue"))
    adjectives: list[str] = []
    locatives: list[str] = []
    predicates: list[str] = []
    for attribute in _ROLE_ORDER:
        if attribute not in slots:
            continue
        surface = LEXICON[attribute, slots[attribute]]
        if surface.locatives:
            place = rng.choice(surface.locatives)
            if rng.random() < 0.5:
                locatives.append(place)
            else:
                predicates.append(f"{rng.choice(('is', 'is located'))} {place}")
        elif surface.adjectives and len(adjectives) < 2 and rng.random() < 0.5:
            adjectives.append(rng.choice(surface.adjectives))
        else:
            predicates.append(rng.choice(surface.verb_phrases))
    rng.shuffle(predicates)
    head = " ".join([*adjectives, noun])
    phrase = " ".join([_article(head), head, *locatives])
    said = _conjoin(predicates)
    variant = template % TEMPLATES
    if variant == 3 and said:
        return f"{name}, {phrase}, {said}."
    if variant == 2:
        return f"There is {phrase} called {name}." + (f" It {said}." if said else "")
    if variant == 1 and said:
        return f"{name} is {phrase}. It {said}."
    return f"{name} is {phrase}" + (f" that {said}." if said else ".")


def write_references(mr: MR, rng: random.Random, count: int) -> tuple[str, ...]:
    """``count`` distinct references for ``mr``, cycling through the templates."""
    found: list[str] = []
    start = rng.randrange(TEMPLATES)
    for attempt in range(50 * count):
        text = realise(mr, rng, start + attempt)
        if text not in found:
            found.append(text)
            if len(found) == count:
                return tuple(found)
    raise ValueError(f"cannot write {count} distinct references for {render(mr)}")


def _article(phrase: str) -> str:
    return "an" if phrase[0].lower() in "aeiou" else "a"


def _conjoin(phrases: Sequence[str]) -> str:
    return " and ".join([", ".join(phrases[:-1]), phrases[-1]]) if len(phrases) > 1 else "".join(phrases)


# --- the slot checker ---------------------------------------------------------------------------------


def realized_slots(mr: MR | Mapping[str, str], text: str) -> dict[str, bool]:
    """For each attribute of ``mr``, whether ``text`` expresses its value (by ``LEXICON`` forms, whole
    words, ignoring case, hyphens and "n't"). The MR's name and landmark are blanked out before the other
    attributes are checked, so "near Raja Indian Cuisine" does not say food[Indian]."""
    slots = make_mr(mr)
    whole = _normalise(text)
    rest = whole
    for key, value in slots:
        if key in ("name", "near"):
            rest = rest.replace(_normalise(value), " | ")
    found = {}
    for key, value in slots:
        where = whole if key in ("name", "near") else rest
        if key == "familyFriendly":
            negative = _mentions(where, LEXICON[key, "no"].forms)
            found[key] = (
                negative if value == "no" else _mentions(where, LEXICON[key, "yes"].forms) and not negative
            )
        else:
            found[key] = _mentions(where, LEXICON[key, value].forms)
    return found


def _normalise(text: str) -> str:
    text = text.lower().replace("’", "'").replace("n't", " not").replace("-", " ")
    return " ".join(text.split())


def _mentions(text: str, forms: Iterable[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(_normalise(form))}(?!\w)", text) for form in forms)


# --- the splits ---------------------------------------------------------------------------------------


def key_sets() -> list[tuple[str, ...]]:
    """Every attribute set an MR may have: the name plus 2–5 of the other attributes (112 sets)."""
    return [
        ("name", *others) for size in range(2, 6) for others in itertools.combinations(ATTRIBUTES[1:], size)
    ]


def build_splits(seed: int = 0, full_size: int = 480, low_size: int = 48, test_size: int = 64) -> Splits:
    """The training sets and the test set for ``seed``: all MRs distinct, the same splits for the same seed."""
    if not 0 < low_size <= full_size or test_size < 1:
        raise ValueError(
            f"need 0 < low_size <= full_size and test_size >= 1, got {low_size}, {full_size}, {test_size}"
        )
    rng = random.Random(seed)
    keys = key_sets()
    reserved = rng.sample(keys, TEST_ONLY_KEY_SETS)
    open_keys = [k for k in keys if k not in reserved]
    seen = {
        key: tuple(v for v in values if v not in TEST_ONLY.get(key, ())) for key, values in VALUES.items()
    }
    train_mrs = _distinct(
        lambda _: tuple((k, rng.choice(seen[k])) for k in rng.choice(open_keys)), full_size, set()
    )
    given = dict.fromkeys(TEST_ONLY, 0)  # held-out values handed out so far, cycling through each list

    def test_value(key: str) -> str:
        if key in TEST_ONLY and rng.random() < UNSEEN_SHARE[key]:
            given[key] += 1
            return TEST_ONLY[key][(given[key] - 1) % len(TEST_ONLY[key])]
        return rng.choice(seen[key])

    def draw_test(index: int) -> MR:
        unseen_keys = index % UNSEEN_KEYS_EVERY == 0
        keys = reserved[index // UNSEEN_KEYS_EVERY % len(reserved)] if unseen_keys else rng.choice(open_keys)
        return tuple((key, test_value(key)) for key in keys)

    test_mrs = _distinct(draw_test, test_size, set(train_mrs))
    rng.shuffle(test_mrs)
    full = tuple(Example(mr, write_references(mr, rng, TRAIN_REFERENCES)) for mr in train_mrs)
    test = tuple(Example(mr, write_references(mr, rng, TEST_REFERENCES)) for mr in test_mrs)
    return Splits(full=full, low=full[:low_size], test=test)


def _distinct(draw: Callable[[int], MR], size: int, taken: set[MR]) -> list[MR]:
    """``size`` MRs from ``draw(index)`` that are new to ``taken`` and to each other."""
    found: list[MR] = []
    for _ in range(100 * size):
        mr = draw(len(found))
        if mr not in taken:
            taken.add(mr)
            found.append(mr)
            if len(found) == size:
                return found
    raise ValueError(f"could not draw {size} distinct MRs")


# --- files and few-shot prompts -----------------------------------------------------------------------


def write_jsonl(examples: Iterable[Example], path: Path, *, all_references: bool = False) -> Path:
    """Write ``{"prompt", "completion"}`` lines (what ``prefix-serve train`` reads), plus ``references`` and
    ``mr`` when ``all_references`` (for the test set; the trainer ignores the extra keys)."""
    lines = []
    for example in examples:
        record: dict[str, object] = {"prompt": example.prompt, "completion": example.completion}
        if all_references:
            record |= {"references": list(example.references), "mr": dict(example.mr)}
        lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def few_shot_examples(splits: Splits, k: int = 3) -> tuple[Example, ...]:
    """``k`` examples of the low-data training set to show the prompted base model, chosen greedily to
    show as many attributes as possible (earliest first on ties)."""
    chosen: list[Example] = []
    shown: set[str] = set()
    pool = list(splits.low)
    for _ in range(min(k, len(pool))):
        best = max(pool, key=lambda example: len({key for key, _ in example.mr} - shown))
        pool.remove(best)
        chosen.append(best)
        shown |= {key for key, _ in best.mr}
    return tuple(chosen)
