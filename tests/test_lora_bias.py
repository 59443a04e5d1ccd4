"""PEFT's `lora_bias` (a trainable bias on B: ΔW·x + s·b): config, numerics against PEFT both ways, merge, mixed
batches, training and the refusals. combine and extract: tests/test_lora_bias_tools.py.

Tolerance: lorakit and PEFT compute the same float32 operations, so logits (~1) agree to ~1e-7; we allow 1e-5, as
test_peft_interop.py does. A merge adds s·b to the bias in float32: again ~1e-7 on the logits, 1e-5 allowed.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetError
from lorakit.control import merged
from lorakit.mixed import row_adapters

from tiny import (
    ConvNet,
    ids,
    peft_config,
    perturb_peft,
    randomize,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
ATTN0 = "model.layers.0.self_attn"


def _biases(model, std: float = 0.3, seed: int = 5) -> None:
    """Give every lora_bias a random value (randomize moves A and B; b too, but by a small amount)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_bias"):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _out(model, x):
    y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def _conv_ids():
    return torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))


CASES = {  # make, targets, inputs: every base layer kind PEFT's lora_bias works on
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj", "o_proj", "down_proj"], ids),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], ids),
    "conv": (ConvNet, ["conv1", "conv2", "head"], _conv_ids),
}


# -- config ---------------------------------------------------------------------------------------------------


def test_config_maps_to_peft_and_back():
    cfg = LoraConfig(r=4, targets=["q_proj"], lora_bias=True)
    d = cfg.to_peft_dict()
    assert d["lora_bias"] is True
    assert LoraConfig.from_peft_dict(d) == cfg
    assert LoraConfig.from_peft_dict({**d, "lora_bias": False}).lora_bias is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_dora": True}, "lora_bias does not work with use_dora (as in PEFT)"),
        ({"init": "gaussian"}, "lora_bias does not work with init='gaussian'"),
        ({"init": "pissa"}, "lora_bias does not work with init='pissa'"),
        ({"target_parameters": ["mlp.w"], "targets": []}, "lora_bias does not work with target_parameters"),
        ({"lora_bias": "yes"}, "lora_bias must be true or false, got 'yes'"),
    ],
)
def test_bad_configs_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        LoraConfig(**{"r": 4, "targets": ["q_proj"], "lora_bias": True, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "method, message",
    [
        ("dylora", "DyLoRA does not support lora.lora_bias"),
        ("adalora", "AdaLoRA does not support lora_bias (as in PEFT)"),
    ],
)
def test_methods_that_cannot_carry_it_refuse_it(method, message):
    from lorakit.train import load_config

    assert load_config(None, ["--lora.lora_bias", "true"]).lora.lora_bias is True
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--lora.lora_bias", "true", "--method", method])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_embedding_target_is_refused_and_the_model_untouched():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"'model.embed_tokens' .*lora_bias does not work with Embedding"):
        lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "embed_tokens"], lora_bias=True))
    assert lorakit.adapter_names(model) == []
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k]), k


# -- numerics, against PEFT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_new_adapter_leaves_the_output_unchanged(case):
    make, targets, inputs = CASES[case]
    model, x = make(), inputs()
    want = _out(model, x)
    lorakit.inject(model, LoraConfig(r=4, targets=targets, lora_bias=True))
    assert torch.equal(_out(model, x), want)  # b starts at zero, like B


@pytest.mark.parametrize("case", CASES)
def test_ours_loads_in_peft(case, tmp_path):
    make, targets, inputs = CASES[case]
    model, x = make(), inputs()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=targets, lora_bias=True))
    randomize(model, std=0.1)
    _biases(model)
    ours = _out(model, x)
    lorakit.save_adapter(model, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    wrapped = [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]
    assert (
        sum(k.endswith(".lora_B.bias") for k in keys)
        == len(wrapped)
        == len(targets) * (1 if case == "conv" else 2)
    )
    theirs = _out(peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval(), x)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # the bias alone moves the output: with b = 0 the logits differ (else the test proves nothing about b)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_bias"):
                p.zero_()
    assert (_out(model, x) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_in_ours(case, tmp_path):
    make, targets, inputs = CASES[case]
    x = inputs()
    pcfg = peft_config(LoraConfig(r=4, alpha=8, targets=targets, lora_bias=True))
    pcfg.init_lora_weights = False
    pmodel = peft.get_peft_model(make(), pcfg).eval()
    perturb_peft(pmodel, std=0.1)  # lora_B.bias too
    theirs = _out(pmodel, x)
    pmodel.save_pretrained(tmp_path / "peft")
    model = make()
    lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_out(model, x), theirs, atol=ATOL, rtol=0)
    assert (theirs - _out(make(), x)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["qwen2", "conv"])
def test_merge_equals_unmerged_and_unmerge_restores_the_bias(case):
    make, targets, inputs = CASES[case]
    model, x = make(), inputs()
    # only modules that have a bias of their own, so that b can be merged (qwen2: q and v, not o or down)
    targets = [t for t in targets if t not in ("o_proj", "down_proj")]
    lorakit.inject(model, LoraConfig(r=4, targets=targets, lora_bias=True))
    randomize(model, std=0.1)
    _biases(model)
    want = _out(model, x)
    before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.bias")}
    lorakit.merge(model)
    torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(before)  # every adapted bias took s·b
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=0)


def test_merge_into_a_layer_without_bias_is_refused_whole():
    model, x = tiny_qwen2(), ids()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "o_proj"], lora_bias=True))
    randomize(model, std=0.1)
    _biases(model)
    before, want = snapshot(model), _out(model, x)
    with pytest.raises(AdapterError) as e:
        lorakit.merge(model)
    assert (
        "o_proj: adapter 'default' has a bias on B (lora_bias) but the Linear it adapts has no bias"
        in str(e.value)
    )
    assert "\n" not in str(e.value)
    for k, v in snapshot(model).items():  # q_proj, which could merge, did not: all or nothing
        assert torch.equal(v, before[k]), k
    assert torch.equal(_out(model, x), want)


def test_a_zero_bias_merges_into_a_layer_without_one():
    # an adapter extracted with lora_bias has b = 0 where the module has no bias: it still merges (PEFT refuses)
    model, x = tiny_qwen2(), ids()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "o_proj"], lora_bias=True))
    randomize(model, std=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_bias"):
                p.zero_() if "o_proj" in n else p.add_(0.2)
    want = _out(model, x)
    lorakit.merge(model)
    torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=0)
    assert model.get_submodule(f"{ATTN0}.o_proj").base_layer.bias is None
    lorakit.unmerge(model)
    torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=0)


# -- many adapters on one base --------------------------------------------------------------------------------


def _three_biased(model):
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], lora_bias=True), name="a")
    lorakit.inject(model, LoraConfig(r=2, alpha=8, targets=["q_proj", "k_proj"], lora_bias=True), name="b")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"]), name="c")  # plain
    randomize(model, std=0.1)
    _biases(model)


def _alone(model, x, names):
    alone = {}
    for name in ("a", "b", "c"):
        lorakit.set_active(model, name)
        alone[name] = _out(model, x)
    with lorakit.disabled(model):
        off = _out(model, x)
    return torch.stack([off[i] if n is None else alone[n][i] for i, n in enumerate(names)])


@pytest.mark.parametrize(
    "names",
    [
        ["b", None, "a", "c"],  # gathered into segments, and a row without adapter
        ["a", "b", "c"],  # one row each in the model's order: the in-place path
        ["a", "a", "c", "b"],  # padded segments, every row adapted
    ],
)
@torch.no_grad()
def test_each_adapter_keeps_its_own_bias_in_mixed_batches(names):
    model, x = tiny_qwen2(), ids(batch=len(names))
    base_bias = model.get_submodule(f"{ATTN0}.q_proj").bias.clone()
    _three_biased(model)
    want = _alone(model, x, names)
    assert torch.equal(model.get_submodule(f"{ATTN0}.q_proj").base_layer.bias, base_bias)
    with row_adapters(model, names):
        got = _out(model, x)
        state = model.get_submodule(f"{ATTN0}.q_proj").row_cache
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert state.stacked and state.c is not None  # the stacked path, with the biases' stack
    n = len(names)
    assert (_alone(model, x, ["a"] * n) - _alone(model, x, ["b"] * n)).abs().max() > 1e-2


@torch.no_grad()
def test_mixed_batch_stacks_follow_a_changed_bias():
    model, x = tiny_qwen2(), ids(batch=3)
    _three_biased(model)
    names = ["a", "b", "c"]
    with row_adapters(model, names):
        _out(model, x)
    _biases(model, seed=11)  # in place: b alone changes
    want = _alone(model, x, names)
    with row_adapters(model, names):
        torch.testing.assert_close(_out(model, x), want, atol=ATOL, rtol=0)


# -- training ---------------------------------------------------------------------------------------------------


def test_training_moves_the_bias_and_saves_it(tmp_path):
    model, x = tiny_qwen2(), ids(batch=4)
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], lora_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(n.endswith("lora_bias") for n in trainable) == 4 and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(5):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    b = dict(model.named_parameters())[f"{ATTN0}.q_proj.adapters.default.lora_bias"]
    assert b.abs().max() > 1e-3  # AdamW's steps of ~1e-2 moved it from zero
    lorakit.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(saved[f"base_model.model.{ATTN0}.q_proj.lora_B.bias"], b.detach())


# -- the real default model -------------------------------------------------------------------------------------


@pytest.mark.real_model
@torch.no_grad()
def test_real_model_lora_bias_in_peft_and_refused_merge(default_model_dir, tmp_path):
    model, tok = lorakit.load_model(str(default_model_dir))
    x = tok(["The capital of France is"], return_tensors="pt").input_ids
    lorakit.inject(model, LoraConfig(r=8, targets=["q_proj", "v_proj"], lora_bias=True))
    randomize(model, std=0.01)
    _biases(model, std=0.05)
    ours = model(x).logits
    lorakit.save_adapter(model, tmp_path / "ad")
    base, _ = lorakit.load_model(str(default_model_dir))
    with lorakit.disabled(model):
        assert (model(x).logits - ours).abs().max() > 1e-2
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()(x).logits
    # 30 layers of float32 on logits ~20: the two tools' different operation order gives ~1e-5 (test_real_model)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)
    with pytest.raises(AdapterError, match="q_proj: adapter 'default' has a bias on B .* has no bias"):
        lorakit.merge(model)  # Llama's projections have no bias
    torch.testing.assert_close(model(x).logits, ours, atol=0, rtol=0)


@torch.no_grad()
def test_inference_that_merges_for_speed_runs_unmerged_when_it_cannot_merge():
    # the training run's accuracy pass merges to decode faster; a lora_bias on Llama's bias-less projections
    # cannot merge, so it must decode unmerged rather than fail the run after training

    model, x = tiny_llama(), ids()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], lora_bias=True))
    randomize(model, std=0.1)
    _biases(model)
    want, before = _out(model, x), snapshot(model)
    with merged(model, or_unmerged=True):
        assert not any(layer.merged for layer in model.modules() if isinstance(layer, lorakit.LoraLayer))
        torch.testing.assert_close(_out(model, x), want, atol=0, rtol=0)
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k]), k
    lorakit.inject(model, LoraConfig(r=4, targets=["v_proj"]), name="plain")
    lorakit.set_active(model, "plain")
    with merged(model, or_unmerged=True):  # a plain adapter still merges
        assert all(
            layer.merged for layer in model.modules() if isinstance(layer, lorakit.LoraLayer) and layer.active
        )
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, lorakit.LoraLayer))
