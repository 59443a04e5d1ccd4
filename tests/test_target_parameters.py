"""LoRA on parameters that are no nn.Linear (PEFT's target_parameters): mixture-of-experts weights stored as one 3-D
parameter (a tiny random Mixtral, (experts, out, in), and a tiny GPT-OSS, (experts, in, out)), and a 2-D
parameter. PEFT's file layout and numbers both ways; switching, merging, training, and the refusals.

Tolerance: the same float32 operations as PEFT (W + ΔW, then the experts' own forward) on logits of size ~1:
1e-5; each test checks that its adapter moves the logits by more than 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetError
from lorakit.params import ParamLora

from tiny import (
    both_ways_with_peft,
    ids,
    inspect_stdout,
    randomize,
    snapshot,
    unchanged,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        layer_types=["full_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GptOssForCausalLM(cfg).eval()
    assert model.model.layers[0].mlp.experts.is_transposed  # stored (experts, in, out)
    return model


def _differs(model, x, out):
    with lorakit.disabled(model):
        return (model(x).logits - out).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "make,cfg",
    [
        (mixtral, LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS)),
        (mixtral, LoraConfig(r=3, alpha=3, targets=[], target_parameters=["down_proj"], use_rslora=True)),
        (mixtral, LoraConfig(r=2, alpha=4, targets=[], target_parameters=["mlp.gate.weight"])),
        (gpt_oss, LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS)),
    ],
    ids=["mixtral-experts", "mixtral-down-only-rslora", "2d-router", "gpt-oss-transposed"],
)
def test_both_ways_with_peft(make, cfg, tmp_path):
    both_ways_with_peft(make, cfg, tmp_path, ids())
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    )  # the same keys, PEFT's nesting included


def test_the_file_nests_as_peft_does(tmp_path):
    model = mixtral()
    lorakit.inject(model, LoraConfig(r=2, targets=[], target_parameters=EXPERTS))
    lorakit.save_adapter(model, tmp_path / "a")
    shapes = {
        k: tuple(v.shape) for k, v in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).items()
    }
    pre = "base_model.model.model.layers.0.mlp.experts"
    assert shapes[f"{pre}.base_layer.lora_A.weight"] == (8, 32)  # gate_up_proj: r·E × in
    assert shapes[f"{pre}.base_layer.lora_B.weight"] == (96, 8)  # out × r·E
    assert shapes[f"{pre}.lora_A.weight"] == (8, 48)  # down_proj, the owner's last parameter: outermost
    assert shapes[f"{pre}.lora_B.weight"] == (32, 8)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == EXPERTS and cfg["target_modules"] == []


def test_experts_lora_trains_and_counts():
    model = mixtral()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], target_parameters=EXPERTS))
    report = lorakit.parameter_report(model)
    per = {(r["parameter"], r["adapter"]): r for r in report["params"]}
    row = per[("model.layers.0.mlp.experts.gate_up_proj", "default")]
    assert row["shape"] == (4, 96, 32) and row["params"] == 8 * 32 + 96 * 8
    assert report["trainable"] == sum(p.numel() for p in lorakit.adapter_parameters(model))
    base = model.model.layers[0].mlp.experts.base_layer.down_proj.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    x = ids()
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    factors = model.model.layers[0].mlp.experts.lora["default"]["down_proj"]
    assert factors.lora_B.abs().max() > 0  # B started at zero: gradients reached it
    assert torch.equal(model.model.layers[0].mlp.experts.base_layer.down_proj, base)


def test_switching_weights_merge_unmerge_and_delete():
    x = ids()
    model = mixtral()
    with torch.no_grad():
        base = model(x).logits
    lorakit.inject(model, LoraConfig(r=2, targets=[], target_parameters=EXPERTS), "a")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], target_parameters=["down_proj"]), "b")
    randomize(model, std=0.1)
    with torch.no_grad():
        outs = {}
        for active in ("a", "b"):
            lorakit.set_active(model, active)
            outs[active] = model(x).logits
        lorakit.set_active(model, {"a": 0.5, "b": 1.0})
        mixed = model(x).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(x).logits, mixed, atol=ATOL, rtol=0)
        with lorakit.disabled(model):  # unmerged for the block, merged again after it
            torch.testing.assert_close(model(x).logits, base, atol=ATOL, rtol=0)
        lorakit.unmerge(model)
        lorakit.set_active(model, "a")
        torch.testing.assert_close(model(x).logits, outs["a"], atol=ATOL, rtol=0)
        assert (outs["a"] - outs["b"]).abs().max() > 1e-3 and (mixed - outs["a"]).abs().max() > 1e-3
        lorakit.delete_adapter(model, "b")
        lorakit.delete_adapter(model, "a")
        assert not any(isinstance(m, ParamLora) for m in model.modules())
        torch.testing.assert_close(model(x).logits, base, atol=ATOL, rtol=0)  # unmerge restored W to rounding


def test_mixed_batches_and_combine_refuse_clearly(tmp_path):
    model = mixtral()
    lorakit.inject(model, LoraConfig(r=2, targets=[], target_parameters=EXPERTS), "a")
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"]), "b")
    with (
        pytest.raises(
            AdapterError, match=r"adapter 'a' adapts parameters of .*experts.* cannot split by row"
        ),
        lorakit.row_adapters(model, ["a", "b"]),
    ):
        pass
    with torch.no_grad(), lorakit.row_adapters(model, ["b", None]):  # adapters without parameters still mix
        assert model(ids()).logits.shape[0] == 2
    for n in "ab":
        lorakit.save_adapter(model, tmp_path / n, n)
    with pytest.raises(AdapterError, match=r"target_parameters .* combine does not support"):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab", allow_missing=True)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (
            LoraConfig(targets=[], target_parameters=["experts.up_proj"]),
            r"'experts.up_proj' matches no parameter",
        ),
        (
            LoraConfig(targets=[], target_parameters=["mlp.experts"]),
            r"'.*mlp\.experts' is a module: name its",
        ),
        (LoraConfig(targets=["q_proj"], target_parameters=["q_proj.weight"]), r"also adapted with LoRA"),
    ],
    ids=["no-parameter", "a-module", "lora-target-too"],
)
def test_bad_target_parameters_are_refused_and_the_model_is_unchanged(cfg, match):
    model = mixtral()
    before = snapshot(model)
    with pytest.raises(TargetError, match=match) as info:
        lorakit.inject(model, cfg)
    assert "\n" not in str(info.value)
    assert lorakit.adapter_names(model) == [] and unchanged(model, before)


def test_settings_peft_refuses_too_are_config_errors():
    for kw, what in (
        (dict(dropout=0.1), "dropout"),
        (dict(use_dora=True), "use_dora"),
        (dict(init="pissa"), "init"),
    ):
        with pytest.raises(ConfigError, match=rf"target_parameters does not work with {what}"):
            LoraConfig(targets=[], target_parameters=EXPERTS, **kw)


def test_a_file_with_misshaped_factors_is_refused_and_the_model_is_unchanged(tmp_path):
    from safetensors.torch import save_file

    model = mixtral()
    lorakit.inject(model, LoraConfig(r=2, targets=[], target_parameters=EXPERTS))
    lorakit.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"
    save_file({**tensors, key: tensors[key][:, :4].contiguous()}, str(weights))
    fresh = mixtral()
    before = snapshot(fresh)
    with pytest.raises(AdapterError, match=r"experts\.lora_B\.weight has shape \(32, 4\), but .*down_proj"):
        lorakit.load_adapter(fresh, tmp_path / "a")
    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(
        AdapterError, match=r"adapts model\.layers\.1\.mlp\.experts\.down_proj but the file lacks"
    ):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert lorakit.adapter_names(fresh) == [] and unchanged(fresh, before)


def test_inspect_shows_the_adapted_parameters(tmp_path):
    model = mixtral()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], target_parameters=EXPERTS))
    lorakit.save_adapter(model, tmp_path / "a")
    out = inspect_stdout(tmp_path / "a")
    assert "model.layers.0.mlp.experts.base_layer: lora_A 8x32, lora_B 96x8" in out
    assert "model.layers.0.self_attn.q_proj" in out
    text = lorakit.format_report(lorakit.parameter_report(model))
    assert "parameter (target_parameters): model.layers.0.mlp.experts.gate_up_proj (4x96x32)" in text
