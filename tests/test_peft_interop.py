"""Adapters saved by lorakit load in PEFT, and PEFT's load in lorakit, with the same logits.

Tolerance: the two tools compute the same float32 operations in a slightly different order (e.g. DoRA's
weight norm), so logits agree to ~1e-6; we allow atol=1e-5 on logits of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig

from tiny import ids, peft_config, perturb_peft, randomize, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5

LLAMA_CASES = [
    pytest.param(LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), id="lora-qv"),
    pytest.param(LoraConfig(r=4, alpha=16, targets="all-linear", use_rslora=True), id="rslora-all-linear"),
    pytest.param(
        LoraConfig(r=4, alpha=8, targets=["q_proj", "o_proj", "down_proj"], use_dora=True), id="dora"
    ),
    pytest.param(LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]), id="embedding"),
    pytest.param(
        LoraConfig(
            r=4,
            alpha=8,
            targets="all-linear",
            rank_pattern={"k_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
            alpha_pattern={"v_proj": 3.0},
        ),
        id="rank-alpha-pattern",
    ),
    pytest.param(
        LoraConfig(r=2, alpha=4, targets=["q_proj", "gate_proj"], layers=[1], layers_pattern="layers"),
        id="layers",
    ),
    pytest.param(
        LoraConfig(r=4, alpha=8, targets=r".*\.(q|v)_proj", exclude=["model.layers.0.self_attn.v_proj"]),
        id="regex-exclude",
    ),
    pytest.param(LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"), id="pissa"),
    pytest.param(LoraConfig(r=4, alpha=8, targets="all-linear", init="olora"), id="olora"),
    pytest.param(LoraConfig(r=4, alpha=8, targets=["q_proj", "up_proj"], init="orthogonal"), id="orthogonal"),
    pytest.param(LoraConfig(r=4, alpha=8, targets="all-linear", use_kasa=True), id="kasa"),
]
GPT2_CASES = [
    pytest.param(LoraConfig(r=4, alpha=8, targets=["c_attn", "c_proj"]), id="conv1d"),
    pytest.param(
        LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"], use_dora=True, bias="lora_only"),
        id="conv1d-dora-bias",
    ),
    pytest.param(
        LoraConfig(r=4, alpha=8, targets=["wte", "c_attn"], use_rslora=True, bias="all"),
        id="conv1d-embedding-rslora",
    ),
]


def _ours_to_peft(make, cfg: LoraConfig, tmp_path, x: torch.Tensor) -> None:
    model = make()
    lorakit.inject(model, cfg)
    randomize(model, std=0.1)
    if cfg.bias != "none":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.dim() == 1:  # trained biases (and DoRA magnitudes)
                    p.add_(0.05)
    ours = model(x).logits
    lorakit.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    theirs = loaded(x).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert (ours - make()(x).logits).abs().max() > 1e-3, (
        "the adapter must change the output, or the test proves nothing"
    )


def _peft_to_ours(make, cfg: LoraConfig, tmp_path, x: torch.Tensor) -> None:
    pcfg = peft_config(cfg)
    from_w0 = cfg.init in ("pissa", "olora", "orthogonal")  # PEFT's own init (PiSSA and OLoRA change W0)
    if not from_w0:
        pcfg.init_lora_weights = False  # random A and B: a non-trivial adapter
    pmodel = peft.get_peft_model(make(), pcfg).eval()
    if cfg.use_dora or from_w0:  # move off the init so magnitude / PiSSA factors are non-trivial
        perturb_peft(pmodel, std=0.05)
    theirs = pmodel(x).logits
    pmodel.save_pretrained(tmp_path / "peft")
    model = make()
    name = lorakit.load_adapter(model, tmp_path / "peft")
    assert name == "default"
    ours = model(x).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (theirs - make()(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", LLAMA_CASES)
def test_llama_ours_loads_in_peft(cfg, tmp_path):
    _ours_to_peft(tiny_llama, cfg, tmp_path, ids())


@pytest.mark.parametrize("cfg", LLAMA_CASES)
def test_llama_peft_loads_in_ours(cfg, tmp_path):
    _peft_to_ours(tiny_llama, cfg, tmp_path, ids())


@pytest.mark.parametrize("cfg", GPT2_CASES)
def test_gpt2_ours_loads_in_peft(cfg, tmp_path):
    _ours_to_peft(tiny_gpt2, cfg, tmp_path, ids())


@pytest.mark.parametrize("cfg", GPT2_CASES)
def test_gpt2_peft_loads_in_ours(cfg, tmp_path):
    _peft_to_ours(tiny_gpt2, cfg, tmp_path, ids())


@pytest.mark.parametrize(
    "extra, label",
    [({"velora_config": {"num_groups": 4}}, "VeLoRA"), ({"monteclora_config": {}}, "MonteCLoRA")],
    ids=["velora", "monteclora"],
)
def test_peft_training_only_variants_load_as_the_plain_lora_they_are_at_inference(extra, label, tmp_path):
    """PEFT's VeLoRA (A's backward keeps compressed activations) and MonteCLoRA (sampled noise on A) change training
    only. Trained a step in PEFT and saved, with their training state in the file, they load here with one
    warning and give PEFT's eval-mode logits."""
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    pmodel = peft.get_peft_model(tiny_llama(), pcfg)
    x = ids()
    pmodel.train()
    opt = torch.optim.SGD([p for p in pmodel.parameters() if p.requires_grad], lr=0.1)
    pmodel(input_ids=x, labels=x).loss.backward()
    opt.step()
    pmodel.eval()
    with torch.no_grad():
        theirs = pmodel(x).logits
    pmodel.save_pretrained(tmp_path)
    model = tiny_llama()
    with pytest.warns(UserWarning, match=f"{label} changes training only"):
        lorakit.load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, theirs, atol=ATOL, rtol=0)
        assert (theirs - tiny_llama()(x).logits).abs().max() > 1e-3
