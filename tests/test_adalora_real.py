"""`lorakit train --method adalora` on the real default model: a short run whose adapter is PEFT's ADALORA layout,
with a rank pattern at the target budget, that PEFT and lorakit load to the same logits.

Tolerance: the two tools compute the same float32 adapter with a different operation order; logits of magnitude
~20 agree to ~1e-5, we allow atol=1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lorakit

pytestmark = pytest.mark.real_model


def test_train_adalora_cli_writes_a_peft_adalora_adapter(tmp_path, default_model_dir):
    out = tmp_path / "run"
    args = [
        "--train.out_dir",
        str(out),
        "--train.steps",
        "3",
        "--train.batch_size",
        "2",
        "--train.warmup_steps",
        "0",
    ]
    args += ["--data.max_len", "64", "--data.n_train", "16", "--data.n_eval", "2"]
    args += ["--eval.limit", "1", "--eval.max_new_tokens", "2", "--lora.targets", "[q_proj, v_proj]"]
    args += ["--adalora.init_r", "4", "--adalora.target_r", "2", "--adalora.tfinal", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--method", "adalora", *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and (cfg["init_r"], cfg["target_r"], cfg["total_step"]) == (4, 2, 3)
    pattern = cfg["rank_pattern"]
    assert len(pattern) == 30 * 2  # q_proj and v_proj of the 30 blocks
    kept = {k: sum(v) for k, v in pattern.items()}
    assert sum(kept.values()) <= 2 * len(pattern) and all(len(v) == 4 for v in pattern.values())
    assert len(set(kept.values())) > 1, "the budget must be spread unevenly"
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, k in kept.items():
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert tensors[module + ".lora_E"].shape == (k, 1) and tensors[module + ".lora_A"].shape[0] == k

    peft = pytest.importorskip("peft")
    model, tok = lorakit.load_model()
    x = tok("The date one week after 2021-03-04 is", return_tensors="pt")["input_ids"]
    lorakit.load_adapter(model, out / "adapter")
    theirs = peft.PeftModel.from_pretrained(lorakit.load_model()[0], out / "adapter").eval()
    with torch.no_grad():
        ours = model(x).logits
        torch.testing.assert_close(theirs(input_ids=x).logits, ours, atol=1e-4, rtol=0)
        with lorakit.disabled(model):
            assert (model(x).logits - ours).abs().max() > 1e-4, "the trained adapter must change the output"
