"""`lorakit train --method dylora|loraplus` end to end on the real default model (a few short steps), then
DyLoRA's set_rank and `lorakit convert --rank`, loaded by PEFT with matching outputs."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main as cli

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

SHORT = [
    "--data.max_len", "64", "--data.n_train", "16", "--data.n_eval", "4", "--eval.limit", "2",
    "--eval.max_new_tokens", "4", "--train.steps", "2", "--train.batch_size", "4", "--train.save_every", "0",
    "--train.warmup_steps", "0", "--train.threads", "1",
]  # fmt: skip


def _train(out, *args):
    """`lorakit train ...` in this process (the same code path as the command, without a second interpreter)."""
    assert cli(["train", "--train.out_dir", str(out), *SHORT, *args]) == 0
    return json.loads((out / "summary.json").read_text())


def test_train_loraplus_on_the_default_model(tmp_path):
    summary = _train(tmp_path, "--method", "loraplus", "--loraplus.ratio", "8", "--train.lr", "2e-4")
    assert summary["steps"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "loraplus" in (tmp_path / "config.yaml").read_text()


def test_train_dylora_then_set_rank_and_convert_for_peft(tmp_path):
    peft = pytest.importorskip("peft")
    _train(
        tmp_path,
        "--method",
        "dylora",
        "--lora.r",
        "8",
        "--lora.targets",
        "[q_proj, v_proj]",
        "--train.lr",
        "1e-2",
    )
    adapter = tmp_path / "adapter"
    model, tok = lorakit.load_model()
    lorakit.load_adapter(model, adapter)
    x = tok("The date is", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(x).logits
        lorakit.set_rank(model, 3)
        ours = model(x).logits
    assert not torch.allclose(full, ours, atol=1e-4)  # two DyLoRA steps at lr 1e-2 moved B: rank 3 differs
    assert cli(["convert", "--adapter", str(adapter), "--rank", "3", "--out", str(tmp_path / "r3")]) == 0
    base, _ = lorakit.load_model()
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "r3").eval()
    with torch.no_grad():
        theirs = ref(x).logits
    # 30 layers of float32 sums in another order; logits are O(10): 1e-3 absolute is ~1e-4 relative
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)
