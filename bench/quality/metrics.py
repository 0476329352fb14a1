"""Quality metrics of the table-to-text benchmark: corpus BLEU against several references (sacrebleu, as
the E2E challenge scores it) and slot coverage (how many of the MR's values a sentence expresses, by
``e2e_data.realized_slots``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sacrebleu

from bench.quality.e2e_data import ATTRIBUTES, Example, realized_slots


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0–100, sacrebleu's default 13a tokenisation) of ``hypotheses[i]`` against the
    references ``references[i]``. A shorter reference list is padded with its last reference, which
    changes no count: BLEU clips each n-gram by its count in the single reference that holds it most."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need one reference list per hypothesis, got {len(hypotheses)} and {len(references)}"
        )
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("each hypothesis needs a non-empty list of reference strings")
    width = max(len(refs) for refs in references)
    padded = [[*refs, *[refs[-1]] * (width - len(refs))] for refs in references]
    streams = [[refs[j] for refs in padded] for j in range(width)]  # sacrebleu: one stream per reference
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


@dataclass(frozen=True)
class SlotCoverage:
    """How much of the MRs a set of hypotheses expresses."""

    slot_recall: float  # slots realised / all slots, over the whole set, in [0, 1]
    exact: float  # share of hypotheses that realise every slot of their MR, in [0, 1]
    per_attribute: Mapping[str, float]  # slot recall of each attribute, over the MRs that hold it


def slot_coverage(examples: Sequence[Example], hypotheses: Sequence[str]) -> SlotCoverage:
    """Slot coverage of ``hypotheses[i]`` against ``examples[i].mr``."""
    if len(examples) != len(hypotheses) or not examples:
        raise ValueError(f"need one hypothesis per example, got {len(hypotheses)} and {len(examples)}")
    found = [realized_slots(example.mr, text) for example, text in zip(examples, hypotheses, strict=True)]
    per_attribute = {
        key: sum(slots[key] for slots in found if key in slots) / sum(key in slots for slots in found)
        for key in ATTRIBUTES
        if any(key in slots for slots in found)
    }
    return SlotCoverage(
        slot_recall=sum(sum(slots.values()) for slots in found) / sum(len(slots) for slots in found),
        exact=sum(all(slots.values()) for slots in found) / len(found),
        per_attribute=per_attribute,
    )
