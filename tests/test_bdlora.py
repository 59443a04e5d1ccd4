"""BD-LoRA (PEFT's use_bdlora): a block-diagonal A or B per module, stored as PEFT stores its blocks. Files go both
ways with PEFT with the same logits; only the blocks train (the zeros off them stay zeros); merging, mixed batches,
combine and llama.cpp see the dense factor; what cannot be built is refused in one line with the model left as
it was.

Tolerance: the same float32 operations as PEFT on tiny models (logits of size ~1): 1e-5 (each test checks that
its adapter moves the logits by far more); merged against unmerged: 1e-4 (logits up to ~10 with std-0.3 adapters).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetError
from lorakit.variants.bdlora import BdLoraVariant

from runs import addition_run
from tiny import (
    SEVEN,
    both_ways_with_peft,
    each_row_alone,
    ids,
    randomize,
    refused_untouched,
    tiny_llama,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL, MERGED = 1e-5, 1e-4
SPEC = {  # as BdLoraConfig's docs say for a Llama: row-sharded layers A, column-sharded B
    "target_modules_bd_a": ["o_proj", "down_proj"],
    "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
    "nblocks": 2,
    "match_strict": True,
}


def config(**kw) -> LoraConfig:
    return LoraConfig(r=4, alpha=8, targets=kw.pop("targets", SEVEN), use_bdlora=kw.pop("spec", SPEC), **kw)


@pytest.mark.parametrize(
    "spec, targets",
    [
        (SPEC, SEVEN),
        ({**SPEC, "nblocks": 4}, SEVEN),
        ({"target_modules_bd_a": ["o_proj"], "nblocks": 2, "match_strict": False}, ["q_proj", "o_proj"]),
    ],
    ids=["two-blocks", "four-blocks", "some-plain"],
)
def test_both_ways_with_peft(spec, targets, tmp_path):
    both_ways_with_peft(tiny_llama, config(spec=spec, targets=targets), tmp_path, ids(), std=0.3)
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    n = spec["nblocks"]
    assert ours["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (4, 32 // n)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["use_bdlora"]["nblocks"] == n


def test_only_the_blocks_train_and_merging_is_exact():
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    o = model.model.layers[0].self_attn.o_proj
    q = model.model.layers[0].self_attn.q_proj
    assert o.adapters["default"].lora_A.shape == (4, 16) and q.adapters["default"].lora_B.shape == (32, 2)
    A, _, _ = o.adapters["default"].variant.factors(o.adapters["default"])
    assert A.shape == (4, 32) and A[:2, 16:].abs().max() == 0 and A[2:, :16].abs().max() == 0
    x = ids()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in lorakit.adapter_parameters(model)]
    assert all(g is not None for g in grads)
    with torch.no_grad():
        model.eval()
        out = model(x).logits
        with lorakit.disabled(model):
            assert (model(x).logits - out).abs().max() > 1e-2
        plain = lorakit.unload(model, merge=True)
        torch.testing.assert_close(plain(x).logits, out, atol=MERGED, rtol=0)


def test_mixed_batches_equal_each_row_alone():
    model = tiny_llama()
    lorakit.inject(model, config(), "bd")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN), "plain")
    randomize(model, std=0.3)
    x = ids(batch=3)
    rows = ["bd", None, "plain"]
    alone = each_row_alone(model, x, rows)
    with torch.no_grad(), lorakit.row_adapters(model, rows):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-2


def test_lorakit_train_learns_with_it(tmp_path):
    spec = json.dumps(SPEC)
    summary, model = addition_run(
        tmp_path, "--lora.use_bdlora", spec, "--train.steps", "30", "--train.lr", "5e-3"
    )
    assert summary["after"]["loss"] < summary["before"]["loss"]
    written = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["use_bdlora"] == SPEC
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer.adapters["default"].variant, BdLoraVariant)


def test_combine_gives_plain_lora_of_the_dense_factors(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, config(), "a", activate=False)
    lorakit.inject(model, config(spec={**SPEC, "nblocks": 4}), "b", activate=False)
    randomize(model, std=0.3)
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, name)
    lorakit.set_active(model, {"a": 0.5, "b": 0.5})
    with torch.no_grad():
        want = model(ids()).logits
    lorakit.combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], "cat", tmp_path / "ab")
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["use_bdlora"] is None
    back = tiny_llama()
    lorakit.load_adapter(back, tmp_path / "ab")
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, want, atol=ATOL, rtol=0)


def test_saved_plain_it_is_dense_lora_that_loads_without_bdlora(tmp_path):
    model = lorakit.inject(tiny_llama(), config(spec={"target_modules_bd_a": ["o_proj"], "match_strict": False}))
    randomize(model, std=0.3)
    x = ids()
    with torch.no_grad():
        ours = model(x).logits
    lorakit.save_adapter(model, tmp_path, plain=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["use_bdlora"] is None and written["r"] == 4
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(spec={**SPEC, "match_strict": True}, targets=[*SEVEN, "lm_head"]), "matches neither"),
        (dict(spec={**SPEC, "nblocks": 3}), "divisible by 3"),
        (dict(spec={"target_modules_bd_a": ["proj"], "target_modules_bd_b": ["q_proj"]}), "matches both"),
        (
            dict(
                spec={"target_modules_bd_a": ["embed_tokens"], "match_strict": False},
                targets=["embed_tokens"],
            ),
            "nn.Linear",
        ),
    ],
    ids=["strict", "indivisible", "both", "embedding"],
)
def test_what_cannot_be_built_is_refused_and_the_model_left_as_it_was(kw, words):
    model = tiny_llama()
    refused_untouched(model, TargetError, words, lambda: lorakit.inject(model, config(**kw)))


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["o_proj"]}, "in both"),
        ({"nblocks": 0}, "nblocks must be a positive integer"),
        ({"nblocks": 2, "shards": 2}, "must be a dict with keys"),
        ({"target_modules_bd_a": "o_proj"}, "must be a list of strings"),
    ],
    ids=["overlap", "nblocks", "unknown-key", "not-a-list"],
)
def test_bad_settings_are_config_errors(spec, words):
    with pytest.raises(ConfigError, match=words):
        config(spec=spec)
    with pytest.raises(ConfigError, match="use_bdlora does not work with use_dora"):
        config(use_dora=True)


def test_a_peft_file_for_another_split_is_refused(tmp_path):
    """A PEFT BD-LoRA file whose patterns leave a target unmatched (match_strict) cannot be built here either."""
    model = lorakit.inject(tiny_llama(), config())
    lorakit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_bdlora"]["target_modules_bd_b"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_llama()
    with pytest.raises(AdapterError, match="matches neither"):
        lorakit.load_adapter(fresh, tmp_path)
    assert "_lorakit" not in fresh.__dict__


@pytest.mark.real_model
def test_real_model_both_ways_with_peft(default_model_dir, tmp_path):
    """SmolLM2 with BD-LoRA of 3 blocks (its 576-wide layers and 9 heads divide by 3): PEFT computes our logits
    (atol 2e-3: logits ~40, float32 sums over 30 layers)."""
    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    lorakit.inject(model, LoraConfig(r=6, alpha=12, targets=SEVEN, use_bdlora={**SPEC, "nblocks": 3}))
    randomize(model, std=0.02)
    with torch.no_grad():
        ours = model(x).logits
        with lorakit.disabled(model):
            assert (model(x).logits - ours).abs().max() > 0.1
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(lorakit.load_model(default_model_dir)[0], tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=2e-3, rtol=0)


def test_inspect_gives_the_dense_shape_and_the_stored_blocks(tmp_path):
    from tiny import inspect_stdout

    lorakit.save_adapter(lorakit.inject(tiny_llama(), config(spec={**SPEC, "nblocks": 4})), tmp_path)
    out = inspect_stdout(tmp_path)
    assert "BD-LoRA: 4 blocks" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("model.layers.0.self_attn.o_proj"))
    assert row[1:] == ["4", "32", "32", "1,024", str(4 * 32 // 4 + 32 * 4)]  # A's four blocks, a dense B


def test_the_report_counts_the_blocks():
    model = lorakit.inject(tiny_llama(), config(spec={**SPEC, "nblocks": 4}))
    report = lorakit.parameter_report(model)
    o = next(row for row in report["layers"] if row["module"].endswith("layers.0.self_attn.o_proj"))
    assert o["lora"] == 4 * 32 // 4 + 32 * 4  # A's four blocks, a dense B
    assert sum(row["lora"] for row in report["layers"]) == report["trainable"]


def test_the_fused_kernels_run_it_with_the_plain_paths_gradients():
    """The block-diagonal factor goes through the fused LoRA kernels as its dense matrix (their gradients reach the
    blocks through it): the same loss and gradients as the generic path (float32, 1e-5 relative)."""
    from tiny import graph_names

    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    model.train()
    x = ids()

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return (
            loss,
            graph_names(loss),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
        )

    loss, names, grads = run()
    before = lorakit.set_fused(False)
    try:
        plain_loss, plain_names, plain = run()
    finally:
        lorakit.set_fused(before)
    assert "_LoraLinearBackward" in names and "_LoraLinearBackward" not in plain_names
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for n, g in plain.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)
