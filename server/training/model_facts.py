"""What a run's checks need to know about the base model, read without its weights (in well under a second).

The data's lines are tokenised and measured against the model's positions, and a resumed run's checkpoint
is matched with the model's geometry, before the weights are loaded: a bad file or a wrong ``--resume``
fails at once, not after loading a large model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from prefix_store.geometry import ModelGeometry
from server.engine.base_model import BaseModel, max_positions_of
from server.training.errors import TrainingError


@dataclass(frozen=True)
class ModelFacts:
    tokenizer: PreTrainedTokenizerBase
    geometry: ModelGeometry
    max_positions: int | None  # prefix + prompt + completion must fit; None = no limit

    @classmethod
    def of(cls, base: BaseModel) -> ModelFacts:
        """The facts of a model already loaded."""
        return cls(base.tokenizer, base.geometry, base.max_positions)


def read_model_facts(model_path: str | Path) -> ModelFacts:
    """The tokenizer and config of a Hugging Face model folder; raises ``TrainingError`` if unreadable."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        config = AutoConfig.from_pretrained(model_path).get_text_config()
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the model {model_path}: {exc}") from None
    # run_training checks the loaded model's geometry against these
    return ModelFacts(tokenizer, ModelGeometry.from_config(config), max_positions_of(config))
