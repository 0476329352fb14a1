"""What a training method learns, as the loop, the checkpoint and the export see it: the one seam between
the methods.

Two implementations, one module each: ``prefix_params.TrainablePrefix`` (``--method prefix``: keys and
values in every layer, directly or through the paper's MLP) and ``soft_prompt_params.TrainableSoftPrompt``
(``--method prompt-tuning``: input embeddings before the prompt). Everything else (data, optimiser,
schedule, clipping, checkpoints, evaluation) is the same code for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prefix_store.geometry import ModelGeometry
from prefix_store.soft_prompt import Adapter
from server.engine.base_model import BaseModel
from server.training.data import Example


class TrainedParams(nn.Module):
    """The parameters one method trains on the frozen base model.

    AdamW updates the parameters that require gradients; ``state_dict`` is what a checkpoint keeps.
    """

    geometry: ModelGeometry
    num_virtual_tokens: int

    def completion_loss(self, base: BaseModel, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """Summed teacher-forced cross-entropy over the completion tokens of ``examples`` on ``base``
        conditioned by these parameters (differentiable), and how many tokens that is."""
        raise NotImplementedError

    def export(self) -> Adapter:
        """What is served: a ``Prefix`` or a ``SoftPrompt``, plain float32 CPU tensors."""
        raise NotImplementedError

    @property
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
