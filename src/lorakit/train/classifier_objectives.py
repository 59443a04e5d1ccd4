"""The classifiers' objectives: a head of one output per class instead of the LM head.

`classify`: a text classifier's cross-entropy on labelled texts (a sequence classifier's head on the last token,
or an encoder's pooled output); with several classes per text, each class's binary cross-entropy. `regression`:
the squared error of a head with one output against texts labelled with numbers. `token_classify`: a token
classifier's cross-entropy of each token's tag (named entities, or any typed spans of a text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.labels import Labelled
from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.train.losses import class_loss, multi_label_loss
from lorakit.train.objective_base import Objective

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


def head_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], dims: int, objective: str, what: str
) -> torch.Tensor:
    """The model's head outputs for a micro-batch, in float32; ValueError naming `what` the objective needs where
    they do not have `dims` dimensions (a causal LM's logits, say)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.dim() != dims:
        raise ValueError(
            f"train.objective {objective} needs {what}, got logits of shape {tuple(logits.shape)}"
        )
    return logits.float()


class ClassifyObjective(Objective):
    """Text classification on `Labelled` rows: the cross-entropy of the model's class logits (a sequence
    classifier's head on the last token, or an encoder's pooled output) against each row's class (weighted by
    class with `class_weights`); with `multi_label`, each class's binary cross-entropy against whether the row has
    it (transformers' multi_label_classification loss; `class_weights` weigh each class's positives, pos_weight)."""

    name = "classify"
    rows = "labelled"
    generates = False

    def __init__(self, cfg: RunConfig) -> None:
        self.num_labels = None  # the classes of the train data: set by the run once it has read them
        # each class's weight in the loss (classify.class_weights)
        self.class_weights: list[float] | None = None
        self.multi_label = False  # several classes per text (each row's label a tuple of ids): set by the run

    def encoded(self, rows: list[Labelled]) -> list[Encoded]:
        return [r.row for r in rows]

    def extras(self, rows: list[Labelled]) -> dict[str, torch.Tensor]:
        if self.multi_label:  # each row's classes as 0/1 per output
            hot = torch.zeros(len(rows), self.num_labels)
            for i, r in enumerate(rows):
                hot[i, list(r.label)] = 1.0
            return {"class_targets": hot}
        return {"class_labels": torch.tensor([r.label for r in rows])}

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's class logits, in float32."""
        return head_logits(
            model, batch, 2, "classify", "a sequence classifier (one row of class logits per example)"
        )

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        logits = self.logits(model, batch)
        if self.multi_label:  # each class a yes or no: transformers' multi_label_classification loss
            hot = batch["class_targets"].to(logits)
            loss = multi_label_loss(logits, hot, self.class_weights)
            exact = ((logits.detach() > 0) == (hot > 0.5)).all(-1)
            return loss, {"accuracy": float(exact.float().mean())}
        target = batch["class_labels"].to(logits.device)
        loss = class_loss(logits, target, self.class_weights)
        return loss, {"accuracy": float((logits.detach().argmax(-1) == target).float().mean())}


class RegressionObjective(ClassifyObjective):
    """Regression on `Labelled` rows whose label is a number: the mean squared error of the model's one output (a
    sequence classifier's head with one output: transformers' problem_type "regression", its own loss) against
    each row's target."""

    name = "regression"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.num_labels = 1

    def extras(self, rows: list[Labelled]) -> dict[str, torch.Tensor]:
        return {"targets": torch.tensor([float(r.label) for r in rows])}

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        predicted = self.logits(model, batch)[:, 0]
        return F.mse_loss(predicted, batch["targets"].to(predicted)), {}


class TokenClassifyObjective(Objective):
    """Token classification on `Tagged` rows (`lorakit.data.tagging`): the mean cross-entropy of each token's tag
    logits (a token classifier's head on every token) against its tag, over the tokens that have one (the
    tokenizer's special tokens and the padding have none): transformers' ...ForTokenClassification loss; with
    `class_weights`, each token's cross-entropy times its tag's weight, still averaged over the tagged tokens."""

    name = "token_classify"
    rows = "tagged"
    generates = False

    def __init__(self, cfg: RunConfig) -> None:
        # the tags of the train data's entity types, by id ("O", "B-...", "I-...": tagging.tag_names), and their
        # number: set by the run once it has read them
        self.names: list[str] = []
        self.num_labels = None
        self.class_weights: list[float] | None = (
            None  # each tag's weight in the loss (classify.class_weights)
        )

    def encoded(self, rows: list) -> list[Encoded]:
        return [r.row for r in rows]

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each token's tag logits (batch × tokens × tags), in float32."""
        return head_logits(
            model, batch, 3, "token_classify", "a token classifier (a row of tag logits per token)"
        )

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        logits = self.logits(model, batch)
        target = batch["labels"].to(logits.device)
        tagged = target != IGNORE
        if self.class_weights is None:
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        else:  # each tagged token's cross-entropy times its tag's weight, averaged over the tagged tokens
            w = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
            ce = F.cross_entropy(
                logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none"
            )
            weighted = ce * w[target.flatten().clamp(min=0)] * tagged.flatten()
            loss = weighted.sum() / tagged.sum().clamp(min=1)
        right = (logits.detach().argmax(-1) == target) & tagged
        return loss, {"accuracy": float(right.sum() / tagged.sum().clamp(min=1))}
