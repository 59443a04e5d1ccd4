"""The OLoRA and orthogonal inits (`lorakit.variants.pissa`, `lorakit.variants.orthogonal`) against PEFT's own:
the same A, B and (for OLoRA) the same residual base weight; what each promises (an unchanged output, B·A = 0
with both factors learning from the first step); their bad inputs; and OLoRA on the real default model, saved and
loaded by PEFT. (Files both ways, for every init, are in test_peft_interop.)

PiSSA and OLoRA files load as plain LoRA on the original base (`plain_lora.as_plain_lora`), so that an adapter
bank can hold them beside other adapters: checked against the trained model, and against PEFT's load."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.bank import AdapterBank
from lorakit.errors import AdapterError
from lorakit.variants.orthogonal import orthogonal_init

from tiny import ids, peft_config, perturb_peft, randomize, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pairs(ours: nn.Module, theirs: nn.Module):
    """(our LoraLayer, PEFT's LoRA layer) for each targeted module."""
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, lorakit.LoraLayer)}
    for name, layer in mine.items():
        yield layer, theirs.base_model.model.get_submodule(name)


def test_olora_is_peft_olora():
    """QR of the same f32 weight on both sides: A, B and the residual W0 - s·B·A agree to rounding (1e-6 on
    entries of order 0.1-1; measured: equal)."""
    cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init="olora")
    ours = tiny_llama()
    lorakit.inject(ours, cfg)
    theirs = peft.get_peft_model(tiny_llama(), peft_config(cfg))
    n = 0
    for layer, p in _pairs(ours, theirs):
        a = layer.adapters["default"]
        torch.testing.assert_close(a.lora_A, p.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.lora_B, p.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, p.base_layer.weight, atol=1e-6, rtol=0)
        assert a.lora_B.abs().max() > 0.1  # a real decomposition, not zeros
        n += 1
    assert n == 2 * len(TARGETS)


def test_orthogonal_is_peft_orthogonal_for_the_same_seed():
    """Both draw from torch's global generator in the same order: seeded alike, the factors are equal."""
    cfg = LoraConfig(r=6, alpha=12, targets=TARGETS, init="orthogonal")
    ours = tiny_llama()
    lorakit.inject(ours, cfg)
    theirs = peft.get_peft_model(tiny_llama(), peft_config(cfg))
    for i, (layer, p) in enumerate(_pairs(ours, theirs)):
        torch.manual_seed(100 + i)
        orthogonal_init(layer, layer.adapters["default"])
        torch.manual_seed(100 + i)
        p.orthogonal_init("default")
        torch.testing.assert_close(
            layer.adapters["default"].lora_A, p.lora_A["default"].weight, atol=0, rtol=0
        )
        torch.testing.assert_close(
            layer.adapters["default"].lora_B, p.lora_B["default"].weight, atol=0, rtol=0
        )


def test_orthogonal_starts_at_zero_and_both_factors_learn_at_once():
    """B·A = 0 (the rows of an orthogonal matrix that A and B take are orthogonal to each other), yet A and B are
    not zero, so both get a gradient from the first step; the default init (B = 0) gives A none."""
    x = ids()
    grads = {}
    for init in ("orthogonal", "default"):
        model = tiny_llama()
        lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init=init))
        adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
        if init == "orthogonal":
            product = adapter.lora_B @ adapter.lora_A
            assert product.abs().max() < 1e-6  # f32 rounding of a zero product (entries of A, B ~ 0.1)
            assert adapter.lora_A.abs().min() > 0 and adapter.lora_B.abs().max() > 0.01
        model(x, labels=x).loss.backward()
        grads[init] = (adapter.lora_A.grad.abs().max().item(), adapter.lora_B.grad.abs().max().item())
    assert grads["orthogonal"][0] > 1e-6 and grads["orthogonal"][1] > 1e-6
    assert grads["default"][0] == 0.0 and grads["default"][1] > 1e-6


@pytest.mark.parametrize(
    "cfg, message",
    [
        (LoraConfig(r=3, targets=["q_proj"], init="orthogonal"), "orthogonal init needs an even rank"),
        (LoraConfig(r=40, targets=["q_proj"], init="olora"), "OLoRA init needs r <= 32"),
        (LoraConfig(r=40, targets=["q_proj"], init="pissa"), "PiSSA init needs r <= 32"),
        (LoraConfig(r=4, targets=["embed_tokens"], init="olora"), "OLoRA init supports linear layers only"),
        (
            LoraConfig(r=4, targets=["embed_tokens"], init="orthogonal"),
            "orthogonal init supports linear layers",
        ),
    ],
)
def test_bad_inits_are_one_line_and_leave_the_model_as_it_was(cfg, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as info:
        lorakit.inject(model, cfg)
    assert message in str(info.value) and "\n" not in str(info.value), info.value
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_peft_file_with_an_unknown_init_is_refused_naming_it(tmp_path):
    cfg = LoraConfig(r=4, targets=["q_proj"])
    pmodel = peft.get_peft_model(tiny_llama(), peft_config(cfg))
    pmodel.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(path.read_text().replace('"init_lora_weights": true', '"init_lora_weights": "xavier"'))
    with pytest.raises(lorakit.errors.ConfigError, match="init_lora_weights='xavier' is not supported"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "a")


@pytest.mark.real_model
def test_olora_on_the_real_model_loads_in_peft(default_model_dir, tmp_path):
    """SmolLM2 with OLoRA on all seven projections: the output is unchanged at init; trained (perturbed) and
    saved, PEFT's load redoes the same QR on the original weights and computes the same logits."""
    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["The capital of France is", "LoRA adapts a frozen model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**x).logits
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", init="olora"))
    with torch.no_grad():
        start = model(**x).logits
    # SmolLM2's logits reach ~40 and the residual is W0 - s·B·A in f32: measured ~2e-4
    torch.testing.assert_close(start, base, atol=2e-3, rtol=0)
    randomize(model, std=0.01)
    with torch.no_grad():
        ours = model(**x).logits
    assert (ours - base).abs().max() > 0.1  # the adapter matters
    lorakit.save_adapter(model, tmp_path / "olora")
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "olora").eval()
    with torch.no_grad():
        theirs = theirs_model(**x).logits
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)  # as above


def test_perturbed_peft_orthogonal_loads_in_ours(tmp_path):
    """A PEFT adapter made with init "orthogonal" (its config says so) loads in ours with PEFT's outputs."""
    cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init="orthogonal")
    pmodel = peft.get_peft_model(tiny_llama(), peft_config(cfg)).eval()
    perturb_peft(pmodel, std=0.05)
    x = ids()
    theirs = pmodel(x).logits
    pmodel.save_pretrained(tmp_path / "p")
    assert '"init_lora_weights": "orthogonal"' in (tmp_path / "p" / "adapter_config.json").read_text()
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(model(x).logits, theirs, atol=1e-5, rtol=0)  # f32, logits of order 1


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_a_bank_holds_pissa_and_olora_beside_others_without_touching_the_base(init, rslora, tmp_path):
    """Loaded into a bank, a PiSSA or OLoRA adapter answers as the trained model did, while the base and another
    adapter answer as before: the file becomes plain LoRA of rank 2r on the original W0 (A' = [A; A0],
    B' = [B, -B0], the same s), not a change of W0 that every other adapter would see."""
    x = ids()
    cfg = LoraConfig(
        r=4,
        alpha=8,
        targets="all-linear",
        init=init,
        use_rslora=rslora,
        rank_pattern={"k_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    trained = tiny_llama()
    lorakit.inject(trained, cfg, "p")
    randomize(trained)
    want = trained(x).logits
    lorakit.save_adapter(trained, tmp_path / "p", "p")
    other = tiny_llama()
    lorakit.inject(other, LoraConfig(r=4, targets=["q_proj", "up_proj"]), "o")
    randomize(other, seed=9)
    other_want = other(x).logits
    lorakit.save_adapter(other, tmp_path / "o", "o")

    model = tiny_llama()
    with torch.no_grad():
        base = model(x).logits
    bank = AdapterBank(model)
    bank.load("o", tmp_path / "o")
    bank.load("p", tmp_path / "p")
    with torch.no_grad():
        for name, expected in ((None, base), ("o", other_want), ("p", want)):
            bank.activate(name)
            # f32 with logits of order 1: the two sides differ in summation order only (measured ~4e-7)
            torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=0)
    assert (want - base).abs().max() > 0.1  # the adapter matters
    layer = model.model.layers[0].self_attn.k_proj
    assert layer.adapters["p"].lora_A.shape[0] == 4 and layer.adapters["p"].base_residual is None  # 2 x r=2
    # saved again, it is a plain LoRA file that PEFT runs on the original base
    lorakit.save_adapter(model, tmp_path / "plain", "p")
    assert '"init_lora_weights": true' in (tmp_path / "plain" / "adapter_config.json").read_text()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=1e-5, rtol=0)  # as above


def test_loaded_to_train_on_a_pissa_file_keeps_its_form(tmp_path):
    """load_adapter(trainable=True) goes on training the adapter as PiSSA: rank r, the residual out of W0."""
    x = ids()
    trained = tiny_llama()
    lorakit.inject(trained, LoraConfig(r=4, targets=["q_proj"], init="pissa"))
    randomize(trained)
    want = trained(x).logits
    lorakit.save_adapter(trained, tmp_path / "p")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "p", trainable=True)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.shape[0] == 4 and adapter.base_residual is not None
    torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)  # as above


def test_what_cannot_take_a_moved_base_weight_says_how_to_make_it_plain(tmp_path):
    """An adapter that moved s·B0·A0 out of W0 in this process cannot go to llama.cpp as a pair (llama.cpp adds it
    to the original W0), nor can its file be combined: both refusals say how to make it plain LoRA, and once it is
    (saved and loaded), the export takes it."""
    from lorakit.combine import combine
    from lorakit.ondevice.adapter import adapter_gguf
    from lorakit.ondevice.names import ExportError

    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="olora"))
    randomize(model)
    with pytest.raises(
        ExportError, match="moved a part of the base weight into itself.*save it and load it again"
    ):
        adapter_gguf(model)
    lorakit.save_adapter(model, tmp_path / "o")
    with pytest.raises(AdapterError, match="olora adapters are relative to a modified base weight"):
        combine([tmp_path / "o", tmp_path / "o"], [0.5, 0.5], "cat", tmp_path / "both")
    assert not (tmp_path / "both").exists()
    plain = tiny_llama()
    lorakit.load_adapter(plain, tmp_path / "o")
    shapes = {shape for name, shape, _, _ in adapter_gguf(plain).tensors if name.endswith(".lora_a")}
    assert shapes == {(8, 32)}  # rank 2 x 4: the file's pair and the moved part (as llama.cpp reads (r, in))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize(
    "make, cfg",
    [
        (tiny_llama, dict(targets=["q_proj", "down_proj"], use_dora=True)),  # DoRA's norm sees W0 + s·B'·A'
        (tiny_gpt2, dict(targets=["c_attn", "c_fc"])),  # GPT-2's Conv1D keeps its weight transposed
    ],
    ids=["llama-dora", "gpt2-conv1d"],
)
def test_a_loaded_pissa_or_olora_file_answers_as_trained_with_dora_and_conv1d(init, make, cfg, tmp_path):
    x = ids()
    trained = make()
    lorakit.inject(trained, LoraConfig(r=4, alpha=8, init=init, **cfg))
    randomize(trained)
    want = trained(x).logits
    lorakit.save_adapter(trained, tmp_path / "p")
    model = make()
    lorakit.load_adapter(model, tmp_path / "p")
    # f32, logits of order 1: the two differ in summation order only (~1e-7 seen)
    torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
    fresh = make()
    assert (want - fresh(x).logits).abs().max() > 0.01  # the adapter matters
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)]
    assert layers and all(torch.equal(m.base_layer.weight, fresh.get_submodule(n).weight) for n, m in layers)
