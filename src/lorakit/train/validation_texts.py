"""The run config's checks of the objectives that learn from whole texts rather than tokens (`validate` runs
them): the classifiers' and the token classifiers' (a head on the last hidden state), a reward model's head, and an
embedding model's (its texts' pooled vectors). Each refusal is one line naming the setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


def whole_rows_checks(cfg: RunConfig, no_pack: str, no_all: str) -> list[tuple[bool, str]]:
    """The checks of an objective whose rows are whole texts, not a language model's tokens (the classifiers, an
    embedding model): no packing (`no_pack` says why), no train_on_all (`no_all`), no aLoRA, no new tokens, no
    FSDP."""
    dsec, o = cfg.data, cfg.train.objective
    return [
        (not dsec.pack, f"data.pack does not work with train.objective {o} ({no_pack})"),
        (not dsec.train_on_all, f"data.train_on_all does not work with train.objective {o} ({no_all})"),
        (
            dsec.alora_invocation is None and cfg.lora.alora_invocation_tokens is None,
            f"aLoRA does not work with train.objective {o}",
        ),
        (not dsec.add_tokens, f"data.add_tokens does not work with train.objective {o}"),
        (
            not cfg.train.fsdp,
            f"train.fsdp does not work with train.objective {o}; use DDP (torchrun without train.fsdp)",
        ),
    ]


def validate_classify(cfg: RunConfig) -> None:
    """A classifier (a regression) trains a head on the last token (an encoder's pooled output), a token
    classifier a head on every token: what feeds or saves something else is refused."""
    t = cfg.train
    o = t.objective
    checks = [
        *whole_rows_checks(cfg, "each example has its own label", "it learns labels, not tokens"),
        (
            t.best_metric not in ("accuracy", "balanced_accuracy", "f1") or o != "regression",
            f"train.best_metric {t.best_metric} is a classifier's; a regression's are loss (its squared error) and "
            "pearson",
        ),
        *head_checks(
            cfg, {"classify": "a classifier", "regression": "a regression"}.get(o, "a token classifier")
        ),
    ]
    weights = cfg.classify.class_weights
    if isinstance(weights, dict):
        checks += [
            (w > 0, f"classify.class_weights: the weight of class {c!r} must be > 0, got {w}")
            for c, w in weights.items()
        ]
    else:
        checks.append(
            (
                weights in ("none", "balanced"),
                f"classify.class_weights must be none, balanced or a mapping of class name -> weight, got {weights!r}",
            )
        )
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def validate_embed(cfg: RunConfig) -> None:
    """An embedding model is trained on its texts' pooled last hidden states, contrasting each anchor with the
    batch's other texts: what feeds or saves something else is refused."""
    t, e = cfg.train, cfg.embed
    start = adapter_task(t.init_adapter) if t.init_adapter else None
    checks = [
        *whole_rows_checks(cfg, "each text is embedded on its own", "it learns no tokens"),
        (
            e.pooling in ("auto", "mean", "last", "cls"),
            f"embed.pooling must be auto, mean, last or cls, got {e.pooling!r}",
        ),
        (e.scale > 0, f"embed.scale must be > 0, got {e.scale}"),
        (e.chunk_size >= 0, f"embed.chunk_size must be >= 0, got {e.chunk_size}"),
        (
            all(d > 0 for d in e.matryoshka_dims) and len(set(e.matryoshka_dims)) == len(e.matryoshka_dims),
            f"embed.matryoshka_dims must be distinct dimensions > 0, got {e.matryoshka_dims}",
        ),
        (
            len(e.matryoshka_weights) in (0, len(e.matryoshka_dims))
            and all(w > 0 for w in e.matryoshka_weights),
            f"embed.matryoshka_weights must be one weight > 0 for each of embed.matryoshka_dims "
            f"{e.matryoshka_dims} (or none: 1 each), got {e.matryoshka_weights}",
        ),
        (
            t.batch_size >= 2,
            "train.objective embed needs train.batch_size >= 2: each anchor is contrasted with the other rows of "
            f"its micro-batch (got {t.batch_size})",
        ),
        (
            cfg.methods[0] != "ladder",
            "train.objective embed pools the model's last hidden states, which a ladder's side network does not "
            "feed; use method lora, dylora or adalora",
        ),
        (
            cfg.lora.init != "lora_ga",
            "lora.init lora_ga starts from the gradient of the language-model loss, which an embedding model does "
            "not have; use another lora.init",
        ),
        (
            start in (None, "FEATURE_EXTRACTION"),
            f"train.init_adapter {t.init_adapter} is a {start} adapter; train.objective embed trains further an "
            "embedding model's adapter (task_type FEATURE_EXTRACTION)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def head_checks(cfg: RunConfig, what: str) -> list[tuple[bool, str]]:
    """The checks of an objective that trains a sequence classifier's head (`what`: "a reward model", "a
    classifier"): the head reads the model's last hidden state, its loss is no language model's, and an adapter
    to train further must be one of its kind."""
    t, objective = cfg.train, cfg.train.objective
    start = adapter_task(t.init_adapter) if t.init_adapter else None
    task = "TOKEN_CLS" if objective == "token_classify" else "SEQ_CLS"
    return [
        (
            cfg.methods[0] != "ladder",
            f"train.objective {objective} puts a head on the model's last hidden state, which a ladder's side "
            "network does not feed; use method lora, dylora or adalora",
        ),
        (
            cfg.lora.init != "lora_ga",
            "lora.init lora_ga starts from the gradient of the language-model loss, which "
            f"{what} does not have; use another lora.init",
        ),
        (
            start in (None, task),
            f"train.init_adapter {t.init_adapter} is a {start} adapter; train.objective {objective} trains "
            f"further {what}'s adapter (task_type {task}): to start from a fine-tuned causal LM adapter, merge "
            "it (lorakit merge) and train on the merged model",
        ),
    ]


def adapter_task(folder: str) -> str | None:
    """The task_type an adapter folder's adapter_config.json names, None where there is none to read (the load
    then says what is wrong)."""
    path = Path(folder) / "adapter_config.json"
    try:
        found = json.loads(path.read_text()).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None
