"""What the classifier tests share (test_classify, test_regression, test_multi_label, test_token_classify): a random
LoRA start on a classifier (`per_token`: a token classifier), PEFT + transformers' own loss + torch's AdamW as the training oracle, and the check that a merged
classifier folder computes what the adapter does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model

from tiny import cli_here


def random_start(model_dir: Path, folder: Path, num_labels: int, *, per_token: bool = False):
    """(model, tokenizer, saved folder): the tiny classifier with `num_labels` outputs and a LoRA of r=4 on every
    linear layer whose B is random (seed 4), saved to `folder` as the oracle's start."""
    torch.manual_seed(4)
    model, tok = load_model(str(model_dir), num_labels=num_labels, per_token=per_token)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok, lorakit.save_adapter(model, folder)


def random_classifier(
    model_dir: Path,
    out: Path,
    labels: int,
    seed: int,
    *,
    names: list[str] | None = None,
    problem: str | None = None,
    targets: str | list[str] = "all-linear",
    b_std: float = 0.05,
    head_std: float = 0.5,
) -> Path:
    """A classifier's adapter with `labels` outputs saved to `out`: LoRA of r=4 on `targets` with random B, a random
    head, the class `names` and the `problem` (transformers' problem_type) in its metadata."""
    from lorakit.formats import name_classes

    torch.manual_seed(seed)
    model, _ = load_model(str(model_dir), num_labels=labels, dtype=torch.float32)
    if names:
        name_classes(model, names)
    model.config.problem_type = problem
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
            if "score" in name:
                p.normal_(0, head_std)
    return lorakit.save_adapter(model, out)


def lorakit_steps(
    model, tok, rows: list, out: Path, objective: str, **settings
) -> tuple[list[float], object]:
    """3 steps of lorakit's loop on one batch of all `rows` (lr 5e-3, constant), the objective's attributes set
    from `settings` (num_labels, multi_label): (each step's loss, the objective)."""
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.loop import train_loop
    from lorakit.train.objectives import make_objective

    cfg = RunConfig(
        train=TrainSection(
            out_dir=str(out),
            steps=3,
            batch_size=len(rows),
            lr=5e-3,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            objective=objective,
        )
    )
    made = make_objective(cfg)
    for key, value in settings.items():
        setattr(made, key, value)
    records: list[dict] = []
    train_loop(
        model, rows, cfg, pad_id=tok.pad_token_id, out_dir=out, objective=made, callbacks=[records.append]
    )
    return [r["loss"] for r in records if "loss" in r], made


def peft_steps(
    model_dir: Path,
    adapter_dir: Path,
    batch: dict,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    num_labels: int,
    problem_type: str | None = None,
    per_token: bool = False,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """PEFT's model from the same adapter, transformers' own loss for `problem_type` (single-label, regression or
    multi-label classification), torch's AdamW (lorakit's settings: betas 0.9/0.999, eps 1e-8, no weight decay),
    clipping at 1, `steps` steps on one batch: (each step's loss, the trained adapter's tensors). `per_token`: a
    token classifier, `labels` a tag per token."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    kw = {"problem_type": problem_type} if problem_type else {}
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    base = auto.from_pretrained(
        model_dir, num_labels=num_labels, dtype=torch.float32, local_files_only=True, **kw
    )
    base.config.pad_token_id = 2
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, get_peft_model_state_dict(model)


def matches_peft(
    ours_losses: list[float], losses: list[float], model, theirs: dict[str, torch.Tensor]
) -> None:
    """lorakit's steps against PEFT's (`peft_steps`): every step's loss and every trained tensor of the adapter,
    the LoRA pairs and the head, to 1e-5 (float32, the same forward; only kernels' summation order differs); and
    the loss fell."""
    import pytest

    assert ours_losses == pytest.approx(losses, abs=1e-5)
    ours = lorakit.adapter_state_dict(model)
    assert set(ours) == set(theirs) and "base_model.model.score.weight" in ours
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=0, msg=k)
    assert losses[-1] < losses[0]


def merge_matches(
    capsys,
    model_dir: Path,
    adapter: Path,
    out: Path,
    texts: list[str],
    num_labels: int,
    *,
    per_token: bool = False,
) -> dict:
    """`lorakit merge` of a classifier's adapter: the folder transformers loads computes the adapter's logits on
    `texts` (1e-5, float32); returns the merged config.json."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    proc = cli_here(capsys, "merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = load_model(str(model_dir))[1]
    batch = tok(texts, return_tensors="pt", padding=True)
    ours, _ = load_model(str(model_dir), num_labels=num_labels, per_token=per_token)
    lorakit.load_adapter(ours, adapter)
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    merged = auto.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ours.eval()(**batch).logits, atol=1e-5, rtol=0)
    return json.loads((out / "config.json").read_text())
