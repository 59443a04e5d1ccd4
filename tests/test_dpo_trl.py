"""lorakit's DPO against TRL's DPOTrainer (the peer and oracle), and its SimPO, CPO and ORPO against TRL's
CPOTrainer and ORPOTrainer, from the same PEFT adapter on the same model.

A tiny random Llama with SmolLM2's real tokenizer and chat template, and a PEFT adapter whose A and B are both
random (so the policy differs from the reference at step 1 and the first loss is not log 2). Both train 3 AdamW
steps on all pairs as one batch, with the base model (adapter off) as the reference. Compared: the token ids,
every step's loss and implicit rewards, and the adapter after training.

Tolerances: TRL computes log-probabilities from full logits and lorakit from its chunked head, which sums in
another order (float32); over 3 steps of AdamW these differences stay below 5e-5 in TRL's own plain-torch
replay (tests/trl_dpo_oracle.py), so metrics are compared to 1e-4 and the adapter to 2e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data.preference import as_pair, encode_pairs
from lorakit.data.tokenize import IGNORE
from lorakit.models import load_model
from lorakit.train.config import CpoSection, DpoSection, OrpoSection, RunConfig, SimpoSection, TrainSection
from lorakit.train.loop import train_loop
from lorakit.train.objectives import REFERENCE_ADAPTER, make_objective

from trl_dpo_oracle import build_peft_adapter, build_tiny_model, trl_dpo
from trl_ref_free_oracle import trl_ref_free

TEXT_PAIRS = [
    {"prompt": "Q: the capital of France?\nA:", "chosen": " Paris", "rejected": " Lyon"},
    {"prompt": "Q: two plus two?\nA:", "chosen": " four", "rejected": " five, or maybe six"},
    {"prompt": "Q: the colour of the sky?\nA:", "chosen": " blue", "rejected": " green"},
    {"prompt": "Q: a cat says?\nA:", "chosen": " meow", "rejected": " woof woof"},
]
CHAT_PAIRS = [
    {
        "prompt": [{"role": "user", "content": p["prompt"][3:-3]}],
        "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": p["rejected"].strip()}],
    }
    for p in TEXT_PAIRS
]
STEPS, LR = 3, 5e-3
METRICS = {
    "loss": "loss",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("dpo_trl")
    model_dir = build_tiny_model(default_model_dir, root / "model")
    return model_dir, build_peft_adapter(model_dir, root / "adapter")


SECTIONS = {"dpo": DpoSection, "simpo": SimpoSection, "orpo": OrpoSection, "cpo": CpoSection}


def _lorakit(
    model_dir: Path,
    adapter_dir: Path,
    pairs,
    *,
    chat: bool,
    out: Path,
    start: bool = False,
    objective: str = "dpo",
    **settings,
):
    """lorakit's run with `objective` and its section's `settings`; `start`: the adapter as saved is DPO's
    reference (train.init_adapter's way), else the base."""
    model, tok = load_model(str(model_dir), dtype=torch.float32)
    lorakit.load_adapter(model, adapter_dir, trainable=True)
    if start:
        lorakit.load_adapter(model, adapter_dir, REFERENCE_ADAPTER, activate=False)
    rows, _ = encode_pairs(tok, [as_pair(p, "explicit", "pair") for p in pairs], max_len=512, chat=chat)
    cfg = RunConfig(
        train=TrainSection(
            out_dir=str(out),
            steps=STEPS,
            batch_size=len(rows),
            lr=LR,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            max_grad_norm=1.0,
            objective=objective,
            init_adapter=str(adapter_dir) if start else None,
        ),
        **{objective: SECTIONS[objective](**settings)},
    )
    records: list[dict] = []
    train_loop(
        model,
        rows,
        cfg,
        pad_id=tok.pad_token_id,
        out_dir=out,
        objective=make_objective(cfg),
        callbacks=[records.append],
    )
    return rows, records, lorakit.adapter_state_dict(model)


def _same_as_trl(records: list[dict], adapter: dict, theirs: dict) -> list[dict]:
    """lorakit's run against TRL's: as many steps, each step's loss and rewards to 1e-4, the same adapter keys and
    each tensor to 2e-4 (the tolerances of the module docstring). Returns lorakit's step records."""
    steps = [r for r in records if "loss" in r]
    assert len(steps) == len(theirs["logs"]) == STEPS
    for ours, trl in zip(steps, theirs["logs"], strict=True):
        for their_key, our_key in METRICS.items():
            assert ours[our_key] == pytest.approx(trl[their_key], abs=1e-4), (ours["step"], their_key)
    assert set(adapter) == set(theirs["adapter"])
    for key, value in theirs["adapter"].items():
        torch.testing.assert_close(adapter[key], value, atol=2e-4, rtol=0, msg=key)
    return steps


@pytest.mark.parametrize(
    "pairs, chat, loss, smoothing, beta",
    [
        (TEXT_PAIRS, False, "sigmoid", 0.0, 0.1),
        (TEXT_PAIRS, False, "sigmoid", 0.1, 0.1),  # cDPO: TRL gets it from its sigmoid and robust losses
        (TEXT_PAIRS, False, "ipo", 0.0, 0.5),
        (CHAT_PAIRS, True, "sigmoid", 0.0, 0.1),
        (CHAT_PAIRS, True, "ipo", 0.0, 0.5),
        (CHAT_PAIRS, True, "hinge", 0.0, 0.1),
    ],
    ids=["text-sigmoid", "text-cdpo", "text-ipo", "chat-sigmoid", "chat-ipo", "chat-hinge"],
)
def test_dpo_equals_trl(folders, tmp_path, pairs, chat, loss, smoothing, beta):
    model_dir, adapter_dir = folders
    theirs = trl_dpo(
        str(model_dir),
        str(adapter_dir),
        pairs,
        steps=STEPS,
        lr=LR,
        beta=beta,
        loss_type=loss,
        label_smoothing=smoothing,
        out_dir=str(tmp_path / "trl"),
    )
    rows, records, adapter = _lorakit(
        model_dir,
        adapter_dir,
        pairs,
        chat=chat,
        out=tmp_path / "ours",
        beta=beta,
        loss=loss,
        label_smoothing=smoothing,
    )
    for row, (prompt, chosen, rejected) in zip(rows, theirs["token_ids"], strict=True):
        for side, answer in ((row.chosen, chosen), (row.rejected, rejected)):
            assert side.input_ids == prompt + answer
            assert [t for t in side.labels if t != IGNORE] == answer
    assert theirs["logs"][0]["loss"] != pytest.approx(
        0.6931, abs=1e-3
    )  # the adapter starts away from the base
    _same_as_trl(records, adapter, theirs)


def test_dpo_from_an_adapter_equals_trl(folders, tmp_path):
    """Started from a trained adapter (train.init_adapter), the reference is that adapter as it was: TRL's choice
    for a PEFT model that already has one. The first loss is log 2 although the adapter is far from the base."""
    model_dir, adapter_dir = folders
    theirs = trl_dpo(
        str(model_dir),
        str(adapter_dir),
        CHAT_PAIRS,
        steps=STEPS,
        lr=LR,
        beta=0.1,
        out_dir=str(tmp_path / "trl"),
        reference="adapter",
    )
    _, records, adapter = _lorakit(
        model_dir, adapter_dir, CHAT_PAIRS, chat=True, out=tmp_path / "ours", start=True
    )
    steps = _same_as_trl(records, adapter, theirs)
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-6) and steps[0]["reward_margin"] == 0.0


@pytest.mark.parametrize(
    "pairs, chat, objective, settings",
    [
        (TEXT_PAIRS, False, "orpo", {"beta": 0.1}),
        (CHAT_PAIRS, True, "orpo", {"beta": 0.5}),
        (TEXT_PAIRS, False, "simpo", {"beta": 2.0, "gamma": 1.0}),
        (CHAT_PAIRS, True, "simpo", {"beta": 2.5, "gamma": 0.5, "sft_weight": 1.0}),
        (CHAT_PAIRS, True, "cpo", {"beta": 0.1, "sft_weight": 1.0}),  # the paper's CPO
        (TEXT_PAIRS, False, "cpo", {"beta": 0.1, "label_smoothing": 0.1, "sft_weight": 0.0}),
        (TEXT_PAIRS, False, "cpo", {"beta": 0.5, "loss": "ipo", "sft_weight": 0.5}),
        (CHAT_PAIRS, True, "cpo", {"beta": 0.2, "loss": "hinge", "sft_weight": 0.0}),
    ],
    ids=[
        "text-orpo",
        "chat-orpo",
        "text-simpo",
        "chat-simpo-sft",
        "chat-cpo",
        "text-cpo-smoothed",
        "text-cpo-ipo",
        "chat-cpo-hinge",
    ],
)
def test_reference_free_objectives_equal_trl(folders, tmp_path, pairs, chat, objective, settings):
    """SimPO and CPO (TRL's CPOTrainer) and ORPO (TRL's ORPOTrainer) on lorakit's token ids (those trainers
    tokenize their older way; tests/trl_ref_free_oracle.py says how it is replaced, and why the chosen
    answers' token loss is the ORPO paper's). Each step's loss and rewards to 1e-4, the adapter to 2e-4, as
    for DPO."""
    model_dir, adapter_dir = folders
    rows, records, adapter = _lorakit(
        model_dir, adapter_dir, pairs, chat=chat, out=tmp_path / "ours", objective=objective, **settings
    )
    token_ids = []
    for row in rows:
        prompt = [t for t, y in zip(row.chosen.input_ids, row.chosen.labels, strict=True) if y == IGNORE]
        answers = [[t for t in side.labels if t != IGNORE] for side in (row.chosen, row.rejected)]
        assert row.rejected.input_ids == prompt + answers[1]
        token_ids.append((prompt, *answers))
    theirs = trl_ref_free(
        str(model_dir),
        str(adapter_dir),
        token_ids,
        kind=objective,
        steps=STEPS,
        lr=LR,
        beta=settings["beta"],
        gamma=settings.get("gamma", 0.0),
        sft_weight=settings.get("sft_weight", 0.0),
        loss=settings.get("loss", "sigmoid"),
        label_smoothing=settings.get("label_smoothing", 0.0),
        out_dir=str(tmp_path / "trl"),
    )
    _same_as_trl(records, adapter, theirs)
    assert theirs["logs"][-1]["rewards/margins"] > theirs["logs"][0]["rewards/margins"]  # it learned
