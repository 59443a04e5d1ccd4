"""lorakit's KTO against TRL's KTOTrainer (the peer and oracle), from the same PEFT adapter on the same model.

As tests/test_dpo_trl.py: a tiny random Llama with SmolLM2's real tokenizer and chat template, a PEFT adapter
whose A and B are both random (so the policy is away from the reference and the KL estimate is not 0 at step 1),
3 AdamW steps, each on all rows as one batch, the base model (adapter off) as the reference. TRL gets the rows
in the order lorakit's loop draws them at each step (tests/trl_kto_oracle.py says why). Compared: the token ids
of every row and of its KL row, every step's loss and KL estimate, and the adapter after training.

Tolerances as for DPO (tests/test_dpo_trl.py): the chunked head sums in another order than TRL's full logits;
metrics to 1e-4, the adapter to 2e-4.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.data.feedback import encode_feedback
from lorakit.data.tokenize import IGNORE
from lorakit.models import load_model
from lorakit.train.config import KtoSection, RunConfig, TrainSection
from lorakit.train.loop import train_loop
from lorakit.train.objectives import make_objective
from lorakit.train.schedule import batch_order

from test_dpo_trl import CHAT_PAIRS, LR, STEPS, TEXT_PAIRS
from trl_dpo_oracle import build_peft_adapter, build_tiny_model
from trl_kto_oracle import trl_kto


def _rows(pairs, desirable: int) -> list[dict]:
    """TRL's unpaired rows: the first `desirable` pairs' chosen answers (label true), then every pair's rejected
    answer (false)."""
    good = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs[:desirable]]
    return good + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]


def _feedback(row: dict) -> dict:
    """A TRL row as lorakit's feedback item."""
    if isinstance(row["prompt"], str):
        example = {"prompt": row["prompt"], "completion": row["completion"]}
    else:
        example = {"messages": row["prompt"] + row["completion"]}
    return {"example": example, "desirable": row["label"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("kto_trl")
    model_dir = build_tiny_model(default_model_dir, root / "model")
    return model_dir, build_peft_adapter(model_dir, root / "adapter")


@pytest.mark.parametrize(
    "pairs, chat, desirable, settings",
    [
        (TEXT_PAIRS, False, 4, {"beta": 0.1}),
        (CHAT_PAIRS, True, 4, {"beta": 0.5}),
        (CHAT_PAIRS, True, 2, {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.75}),
    ],
    ids=["text", "chat", "chat-unbalanced-weighted"],
)
def test_kto_equals_trl(folders, tmp_path, pairs, chat, desirable, settings):
    model_dir, adapter_dir = folders
    raw = _rows(pairs, desirable)
    model, tok = load_model(str(model_dir), dtype=torch.float32)
    lorakit.load_adapter(model, adapter_dir, trainable=True)
    rows, stats = encode_feedback(tok, [_feedback(r) for r in raw], max_len=512, chat=chat)
    assert len(rows) == len(raw) and stats["dropped"] == 0
    cfg = RunConfig(
        train=TrainSection(
            out_dir=str(tmp_path / "ours"),
            steps=STEPS,
            batch_size=len(rows),
            lr=LR,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            max_grad_norm=1.0,
            objective="kto",
        ),
        kto=KtoSection(**settings),
    )
    objective = make_objective(cfg)
    orders = [batch_order(len(rows), step, 0, cfg) for step in range(STEPS)]
    assert orders[0] != orders[1]  # the steps draw the rows in other orders: the KL rows differ
    records: list[dict] = []
    train_loop(
        model,
        rows,
        cfg,
        pad_id=tok.pad_token_id,
        out_dir=tmp_path / "ours",
        objective=objective,
        callbacks=[records.append],
    )
    theirs = trl_kto(
        str(model_dir),
        str(adapter_dir),
        [[raw[i] for i in order] for order in orders],
        lr=LR,
        out_dir=str(tmp_path / "trl"),
        **settings,
    )
    drawn = [[rows[i] for i in order] for order in orders]
    ours = [e for batch in drawn for e in objective.encoded(batch)[: len(batch)]]
    kl = [e for batch in drawn for e in objective.encoded(batch)[len(batch) :]]
    for row, kl_row, (prompt, completion, kl_completion) in zip(ours, kl, theirs["token_ids"], strict=True):
        assert row.input_ids == prompt + completion
        assert [t for t in row.labels if t != IGNORE] == completion
        assert kl_row.input_ids == prompt + kl_completion
        assert [t for t in kl_row.labels if t != IGNORE] == kl_completion
    steps = [r for r in records if "loss" in r]
    assert len(steps) == len(theirs["logs"]) == STEPS
    for step, trl in zip(steps, theirs["logs"], strict=True):
        assert step["loss"] == pytest.approx(trl["loss"], abs=1e-4), step["step"]
        assert step["kl"] == pytest.approx(trl["kl"], abs=1e-4), step["step"]
    # the text rows keep z clamped at 0 (the adapter makes the mismatched answers less likely than the base
    # does); the chat rows give a positive z, so both sides of the clamp are compared
    assert any(log["kl"] > 1e-2 for log in theirs["logs"]) == chat
    adapter = lorakit.adapter_state_dict(model)
    assert set(adapter) == set(theirs["adapter"])
    for key, value in theirs["adapter"].items():
        torch.testing.assert_close(adapter[key], value, atol=2e-4, rtol=0, msg=key)
