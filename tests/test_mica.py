"""MiCA (`lorakit.variants.mica`, init "mica"): B from W0's minor left singular vectors and frozen, A zero and the
only factor trained. Against PEFT's own (the same B, the same trainable set, files both ways with the same
logits), what it promises (the output unchanged at the start, B unchanged by training, also across a resumed
run), a 4-bit base, its bad inputs, and the real default model."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterError, ConfigError

from runs import addition_run, resumed_equals_uninterrupted
from tiny import (
    SEVEN,
    ids,
    peft_config,
    perturb_peft,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LoraConfig(r=4, alpha=8, targets="all-linear", init="mica")
# The same f32 SVD (torch.linalg.svd) of the same weight on both sides: equal to rounding, 1e-6 on unit vectors.
# Outputs after training are f32 logits of order 1, summed in another order: 1e-5.
ATOL_B, ATOL_OUT = 1e-6, 1e-5


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


def _trained_a(model, name="default", seed=5):
    """What training does to a MiCA adapter: A moves, B stays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            a = layer.adapters[name].lora_A
            a.add_(torch.randn(a.shape, generator=g) * 0.2)


def test_mica_is_peft_mica():
    """B = U[:, -r:] of W0 = U·S·Vh, A = 0, W0 untouched, and the same trainable tensors as PEFT's."""
    ours = tiny_llama()
    w0 = {k: v.clone() for k, v in ours.state_dict().items()}
    lorakit.inject(ours, CFG)
    theirs = peft.get_peft_model(tiny_llama(), peft_config(CFG))
    layers = _lora_layers(ours)
    assert len(layers) == 14  # 7 projections × 2 layers
    for name, layer in layers.items():
        p = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        torch.testing.assert_close(a.lora_B, p.lora_B["default"].weight, atol=ATOL_B, rtol=0)
        assert torch.count_nonzero(a.lora_A) == 0 and torch.count_nonzero(p.lora_A["default"].weight) == 0
        torch.testing.assert_close(a.lora_B.T @ a.lora_B, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal columns
        assert torch.equal(layer.base_layer.weight, w0[f"{name}.weight"])
    mine = sorted(n.replace(".adapters.default", "") for n, p in ours.named_parameters() if p.requires_grad)
    peft_names = sorted(
        n.removeprefix("base_model.model.").replace(".default.weight", "")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    )
    assert mine == peft_names and all(n.endswith("lora_A") for n in mine), mine[:3]


def test_b_spans_the_smallest_singular_directions():
    """The definition, from the other side: W0ᵀ·B has the norms of W0's r smallest singular values."""
    model = tiny_llama()
    lorakit.inject(model, CFG.replace(targets=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    w = layer.base_layer.weight.float()
    s = torch.linalg.svdvals(w)
    got = torch.linalg.norm(w.T @ layer.adapters["default"].lora_B, dim=0)
    torch.testing.assert_close(got, s[-4:], atol=1e-5, rtol=0)


def test_output_unchanged_and_only_a_learns():
    x = ids()
    model = tiny_llama()
    before = model(x).logits
    lorakit.inject(model, CFG)
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)  # A = 0: the update is exactly zero
    b0 = {n: layer.adapters["default"].lora_B.clone() for n, layer in _lora_layers(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, layer in _lora_layers(model).items():
        assert torch.equal(layer.adapters["default"].lora_B, b0[n]), n
        assert layer.adapters["default"].lora_A.abs().max() > 0
    assert (model(x).logits - before).abs().max() > 1e-3  # it learned something


def test_our_mica_file_loads_in_peft_and_peft_s_in_ours(tmp_path):
    x = ids()
    ours = tiny_llama()
    lorakit.inject(ours, CFG)
    _trained_a(ours)
    want = ours(x).logits
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=ATOL_OUT, rtol=0)

    pmodel = peft.get_peft_model(tiny_llama(), peft_config(CFG)).eval()
    perturb_peft(pmodel, std=0.05)
    want = pmodel(x).logits
    pmodel.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    with warnings.catch_warnings():  # PEFT's file has every key, "eva_config": null among them: none is unknown
        warnings.simplefilter("error")
        lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(x).logits, want, atol=ATOL_OUT, rtol=0)


def test_loaded_to_train_b_stays_frozen_and_saves_as_mica_again(tmp_path):
    """A file's B is used as it is (no SVD at load, so the perturbed B of the file survives), frozen again when
    loaded to train, and the init's name survives a save."""
    pmodel = peft.get_peft_model(tiny_llama(), peft_config(CFG))
    perturb_peft(pmodel, std=0.05)
    pmodel.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "peft", trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_A") for n in trainable), trainable[:3]
    for name, layer in _lora_layers(model).items():
        p = pmodel.base_model.model.get_submodule(name)
        assert torch.equal(layer.adapters["default"].lora_B, p.lora_B["default"].weight)
    lorakit.save_adapter(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "mica"


def test_a_4bit_base_takes_mica_from_its_dequantized_weight():
    """PEFT has no MiCA for bitsandbytes layers; ours decomposes the dequantized NF4 weight, and leaves it alone."""
    x = ids()
    model = tiny_llama()
    lorakit.quantize(model, "nf4")
    before = model(x).logits
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, CFG)
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    layer = model.model.layers[1].self_attn.o_proj
    w = layer.handler.weight(layer.base_layer).float()
    u = torch.linalg.svd(w, full_matrices=False)[0][:, -4:]
    torch.testing.assert_close(layer.adapters["default"].lora_B, u, atol=ATOL_B, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in packed.items() if k in after)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (CFG.replace(targets=["embed_tokens"]), "MiCA init supports linear layers only, not Embedding"),
        (CFG.replace(r=40, targets=["q_proj"]), "MiCA init needs r <= 32"),
    ],
)
def test_bad_mica_is_one_line_and_leaves_the_model_as_it_was(cfg, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as info:
        lorakit.inject(model, cfg)
    assert message in str(info.value) and "\n" not in str(info.value), info.value
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not lorakit.adapter_names(model)


def test_mica_with_dora_is_refused_in_code_and_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match="init='mica' does not work with use_dora"):
        CFG.replace(use_dora=True)
    peft.get_peft_model(tiny_llama(), peft_config(CFG)).save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ConfigError, match="adapter_config.json: init_lora_weights='mica' does not work with use_dora"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "p")


def test_lorakit_train_with_mica(tmp_path):
    summary, model = addition_run(tmp_path, "--lora.init", "mica", "--train.lr", "1e-2")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "mica"


def test_a_resumed_mica_run_ends_as_an_uninterrupted_one(tmp_path):
    """The checkpoint holds A only (B is not trainable); the resumed run computes B again from W0, exactly."""
    full, _ = resumed_equals_uninterrupted(tmp_path, CFG, data_init=False)
    assert any(k.endswith("lora_B.weight") for k in lorakit.adapter_state_dict(full))


@pytest.mark.real_model
def test_real_model_mica_matches_peft_and_trains(default_model_dir, tmp_path):
    """SmolLM2, r=8 on every linear layer of its first, a middle and its last decoder layer (21 modules: each
    costs an SVD of its weight on both sides, and the other 27 layers repeat their shapes): the same B as PEFT's;
    three AdamW steps on a real sentence lower its loss and leave every B as it was; saved, PEFT's load gives our
    logits."""
    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["LoRA adapts a frozen model with a low-rank update."], return_tensors="pt")
    cfg = LoraConfig(r=8, alpha=16, targets=SEVEN, layers=[0, 14, 29], init="mica")  # (PEFT: layers need a list)
    lorakit.inject(model, cfg)
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs = peft.get_peft_model(fresh, peft_config(cfg))
    layers = _lora_layers(model)
    assert len(layers) == 21
    b0 = {}
    for name, layer in layers.items():
        b = layer.adapters["default"].lora_B
        torch.testing.assert_close(b, theirs.base_model.model.get_submodule(name).lora_B["default"].weight,
                                   atol=1e-5, rtol=0)  # the same f32 SVD on both sides; B has unit columns
        b0[name] = b.clone()
    del theirs, fresh
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**x, labels=x["input_ids"]).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(layer.adapters["default"].lora_B, b0[n]) for n, layer in layers.items())
    model.eval()
    with torch.no_grad():
        ours = model(**x).logits
    lorakit.save_adapter(model, tmp_path / "mica")
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "mica").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, atol=2e-3, rtol=0)  # logits ~40, f32: as test_inits
