"""The objective every other builds on: supervised fine-tuning's, the mean cross-entropy of the learned tokens.

The loop asks the objective for a micro-batch's tensors and its loss; everything else (the optimizer, the methods'
hooks, checkpoints, resume) is the same for all. The preference objectives are `lorakit.train.objectives`, the
classifiers' (a head instead of the LM head) `lorakit.train.classifier_objectives`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.data.tokenize import Encoded
from lorakit.head import causal_lm_loss


class Objective:
    """Supervised fine-tuning: the mean cross-entropy of the learned tokens (chunked LM head where it can)."""

    name = "sft"
    rows = "examples"
    """What a training row is: "examples" (`Encoded`), "pairs" (`Pair`) or "feedback" (`Feedback`)."""
    precompute = False
    """Whether the loop computes each row's reference log-probabilities once before training (DPO's
    dpo.precompute_reference; `DpoObjective.reference_logprobs`)."""
    num_labels: int | None = None
    """None: the model is a causal LM; else it is a sequence classifier with this many outputs (a reward model's
    1; a classifier's, its classes, set once the data is read), loaded as `lorakit.load_model(num_labels=...)`."""
    generates = True
    """Whether the evaluation decodes answers for exact match (a sequence classifier generates nothing)."""

    def encoded(self, rows: list[Any]) -> list[Encoded]:
        """The token rows a micro-batch of training rows collates into."""
        return rows

    def token_rows(self, rows: list[Any]) -> list[Encoded]:
        """The training rows' own token rows, what a data-driven init (EVA, CorDA, LoRA-GA) reads: `encoded`'s,
        less rows made for the loss alone (KTO's KL rows)."""
        return self.encoded(rows)

    def extras(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        """Tensors of a micro-batch beside its collated token rows (none here)."""
        return {}

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        """(the micro-batch's loss, its statistics to log: floats)."""
        return causal_lm_loss(model, batch, fused=fused), {}
