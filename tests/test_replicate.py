"""Layer replication (`LoraConfig(layer_replication=...)`, PEFT's `layer_replication`, `lorakit.replicate`): the copies
share the base's weights and each has its own adapter; files both ways with PEFT; the KV cache of the copies;
deleting the last adapter gives the original layers back; merging, banks, llama.cpp and mismatched maps are refused
in one line, the model left as it was; `lorakit train`; the real default model."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.control import merged
from lorakit.errors import AdapterError, ConfigError
from lorakit.export import merged_model

from runs import addition_run
from tiny import ids, peft_config, perturb_peft, randomize, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], layer_replication=[[0, 2], [1, 2]])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_copies_share_the_weights_and_each_has_its_own_adapter():
    model = tiny_llama()
    count = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, CFG)
    layers = model.model.layers
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    # layer 2 is a copy of layer 1: the same weight objects, its own adapter, its own cache slot
    assert layers[2].mlp.down_proj.base_layer.weight is layers[1].mlp.down_proj.base_layer.weight
    assert layers[2].mlp.down_proj.adapters["default"].lora_A is not layers[1].mlp.down_proj.adapters["default"].lora_A
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base == count  # no memory for the copies' weights
    per_layer = 4 * (32 + 32) + 4 * (32 + 16) + 4 * (64 + 32)  # q (32->32), v (32->16), down (64->32), r=4
    assert sum(p.numel() for p in lorakit.adapter_parameters(model)) == 3 * per_layer


@pytest.mark.parametrize("rslora", [False, True])
def test_files_both_ways_with_peft(rslora, tmp_path):
    cfg = CFG.replace(use_rslora=rslora)
    x = ids()
    ours = tiny_llama()
    lorakit.inject(ours, cfg)
    randomize(ours)
    want = ours(x).logits
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layer_replication"] == [[0, 2], [1, 2]]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=1e-5, rtol=0)  # f32 logits of order 1
    made = peft.get_peft_model(tiny_llama(), peft_config(cfg))
    perturb_peft(made, 0.1)
    want = made(x).logits
    made.save_pretrained(tmp_path / "theirs")
    back = tiny_llama()
    lorakit.load_adapter(back, tmp_path / "theirs")
    torch.testing.assert_close(back(x).logits, want, atol=1e-5, rtol=0)


def test_the_copies_keep_their_own_kv_cache():
    model = tiny_llama()
    lorakit.inject(model, CFG)
    randomize(model)
    prompt = ids(batch=1, seq=6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        full = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_a_model_that_mixes_attention_kinds_gets_its_layer_types_replicated():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kinds = ["sliding_attention", "full_attention"]
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, use_sliding_window=True, layer_types=kinds,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    lorakit.inject(model, CFG.replace(layer_replication=[[0, 2], [0, 1]]))
    assert model.config.layer_types == [*kinds, "sliding_attention"]
    randomize(model)
    x = ids(batch=1, seq=8)
    with torch.no_grad():  # each copy keeps its kind of attention and its cache slot
        cached = model.generate(x, max_new_tokens=4, do_sample=False)
        full = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    lorakit.delete_adapter(model, "default")
    assert model.config.layer_types == kinds and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("how", ["delete", "unload"])
def test_the_last_adapter_gone_gives_the_original_layers_back(how):
    model = tiny_llama()
    x = ids()
    before, originals = model(x).logits, list(model.model.layers)
    lorakit.inject(model, CFG)
    lorakit.inject(model, CFG.replace(r=2), "second")  # the same map: no second replication
    assert len(model.model.layers) == 3
    randomize(model)
    if how == "delete":
        lorakit.delete_adapter(model, "default")
        assert len(model.model.layers) == 3  # "second" still needs them
        lorakit.delete_adapter(model, "second")
    else:
        lorakit.unload(model, merge=False)
    assert list(model.model.layers) == originals and model.config.num_hidden_layers == 2
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


def test_merging_is_refused_and_changes_nothing():
    model = tiny_llama()
    lorakit.inject(model, CFG)
    randomize(model)
    x = ids()
    want, state = model(x).logits, _state(model)
    for attempt in (lorakit.merge, lambda m: lorakit.unload(m, merge=True)):
        with pytest.raises(AdapterError) as info:
            attempt(model)
        assert "layers are replicated" in str(info.value) and "\n" not in str(info.value)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with merged(model, or_unmerged=True):  # evaluation's fast path runs unmerged instead
        torch.testing.assert_close(model(x).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "value, message",
    [
        ([[2, 1]], "layer ranges with start < end"),
        ([[0]], "layer_replication must be a list"),
        ([], "layer_replication must be a list"),
        ("0-2", "layer_replication must be a list"),
        ([[0, 2.5]], "layer_replication must be a list"),
    ],
)
def test_bad_maps_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        CFG.replace(layer_replication=value)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "lora_ga", "loftq", "eva"])
def test_inits_that_change_or_read_w0_are_refused_with_it(init):
    """PiSSA and its kin would move s·B0·A0 out of the shared W0 once per copy; EVA's and the others' data
    passes read the layers before they are replicated."""
    with pytest.raises(ConfigError, match=f"layer_replication does not work with init='{init}'"):
        CFG.replace(init=init)
    with pytest.raises(ConfigError, match="layer_replication does not work with target_parameters"):
        CFG.replace(targets=[], target_parameters=["mlp.down_proj.weight"])


def _refused(model, fn, error, message):
    state, layers = _state(model), list(model.model.layers)
    names = lorakit.adapter_names(model) if "_lorakit" in model.__dict__ else []
    with pytest.raises(error) as info:
        fn()
    assert message in str(info.value) and "\n" not in str(info.value), info.value
    assert list(model.model.layers) == layers and set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (lorakit.adapter_names(model) if "_lorakit" in model.__dict__ else []) == names


def test_refusals_leave_the_model_as_it_was(tmp_path):
    model = tiny_llama()
    _refused(model, lambda: lorakit.inject(model, CFG.replace(layer_replication=[[0, 3]])), ConfigError, "[0, 3] is not a range")
    _refused(model, lambda: lorakit.inject(model, CFG.replace(targets=["nothing"])), Exception, "nothing")
    assert model.config.num_hidden_layers == 2
    lorakit.inject(model, CFG.replace(layer_replication=None), "plain")
    _refused(model, lambda: lorakit.inject(model, CFG), AdapterError, "add it first, on the plain model")
    replicated = tiny_llama()
    lorakit.inject(replicated, CFG)
    _refused(replicated, lambda: lorakit.inject(replicated, CFG.replace(layer_replication=None), "b"), AdapterError, "must have the same layer_replication")
    _refused(replicated, lambda: lorakit.inject(replicated, CFG.replace(layer_replication=[[0, 2]]), "b"), AdapterError, "must have the same layer_replication")
    # a plain file on a replicated model, and a replicated file on a model with plain adapters
    lorakit.save_adapter(model, tmp_path / "plain", "plain")
    _refused(replicated, lambda: lorakit.load_adapter(replicated, tmp_path / "plain", "p"), AdapterError, "must have the same")
    lorakit.save_adapter(replicated, tmp_path / "rep")
    _refused(model, lambda: lorakit.load_adapter(model, tmp_path / "rep", "r"), AdapterError, "add it first")


def test_banks_llama_cpp_and_mismatched_combines_refuse_it(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, CFG)
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "a")
    bank = lorakit.AdapterBank(tiny_llama())
    with pytest.raises(AdapterError, match="every adapter in a bank") as info:
        bank.load("a", tmp_path / "a")
    assert "\n" not in str(info.value) and bank.names() == []
    with pytest.raises(ConfigError, match="has no llama.cpp form"):
        lorakit.export_gguf(tmp_path / "a.gguf", tmp_path / "a")
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(AdapterError, match="cannot merge, the copied layers share"):  # lorakit merge: before any load
        merged_model(tmp_path / "no-such-model", tmp_path / "a")
    other = tiny_llama()
    lorakit.inject(other, CFG.replace(layer_replication=[[0, 2], [0, 1]]))
    lorakit.save_adapter(other, tmp_path / "b")
    with pytest.raises(AdapterError, match="differently replicated layers"):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab")
    # the same map: combined, and the result keeps it
    lorakit.combine([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], "cat", tmp_path / "aa")
    assert json.loads((tmp_path / "aa" / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 2]]
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "aa")
    x = ids()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-5, rtol=0)  # ½ΔW + ½ΔW


def test_lorakit_train_with_layer_replication(tmp_path):
    summary, model = addition_run(tmp_path, "--lora.layer_replication", "[[0, 2], [1, 2]]", "--lora.r", "4")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["layer_replication"] == [[0, 2], [1, 2]]
    assert any(".layers.2." in k for k in lorakit.adapter_state_dict(model))


@pytest.mark.real_model
def test_real_model_replicated_to_40_layers_loads_in_peft(default_model_dir, tmp_path):
    """SmolLM2 (30 layers) as 0..19 then 10..29: 40 layers, 10 of them copies; trained (perturbed) and saved,
    PEFT's load gives our logits."""
    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["The capital of France is"], return_tensors="pt")
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", layer_replication=[[0, 20], [10, 30]]))
    assert len(model.model.layers) == 40 and model.config.num_hidden_layers == 40
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ours = model(**x).logits
        prompt = x["input_ids"]
        text = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(text, model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))
    lorakit.save_adapter(model, tmp_path / "rep")
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "rep").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, atol=2e-3, rtol=0)  # logits ~40, f32 sums
