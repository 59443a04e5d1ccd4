"""Ladder LoRA (lorakit.variants.ladder): a side network on a frozen decoder, trained without backward through it."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import LadderConfig, attach_ladder
from lorakit.head import causal_lm_loss
from lorakit.variants.ladder import ladder_of

from runs import addition_run
from tiny import ConvNet, ids, tiny_gpt2, tiny_llama

BLOCKS = ["mlp", "transformer"]


def _perturb(model, std: float = 0.3, seed: int = 0) -> None:
    """Random side parameters (the zero up-projection included), so that the ladder changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ladder_of(model).parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _batch(seq: int = 12) -> dict[str, torch.Tensor]:
    x = ids(batch=3, seq=seq)
    labels = x.clone()
    labels[:, :4] = -100
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("block", BLOCKS)
def test_start_equals_base_exactly(make, block):
    """The up-projection starts at zero: logits equal the base's bit for bit (final + 0.0 is exact)."""
    model, x = make(), ids()
    with torch.no_grad():
        base = model(x).logits
        torch.manual_seed(0)
        base_train = model.train()(x).logits  # GPT-2 has dropout in the base: same seed, same masks
    attach_ladder(model.eval(), LadderConfig(reduction=4, rank=4, block=block))
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)
        torch.manual_seed(0)
        assert torch.equal(model.train()(x).logits, base_train)  # the side network draws no random numbers


def test_ladder_layers_follow_every():
    assert LadderConfig(every=1).layers(4) == [0, 1, 2, 3]
    assert LadderConfig(every=3).layers(8) == [2, 5, 7]  # groups of 3 blocks; the last block always feeds one
    assert LadderConfig(every=4).layers(8) == [3, 7]
    assert LadderConfig(every=20).layers(8) == [7]
    model = tiny_llama()
    side = attach_ladder(model, LadderConfig(reduction=4, rank=3, every=2))
    assert side.layers == [1] and len(side.blocks) == 1 and side.width == 8
    assert side.down_a[0].weight.shape == (3, 32) and side.down_b[0].weight.shape == (8, 3)


@pytest.mark.parametrize("block", BLOCKS)
def test_only_the_side_network_trains_and_the_backbone_stays_as_it_was(block):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    side = attach_ladder(model, LadderConfig(reduction=4, rank=4, block=block))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"lorakit_ladder.{n}" for n, _ in side.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = causal_lm_loss(model, _batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.is_grad_enabled()  # the hooks gave autograd back
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]) and p.grad is None, n
    assert not torch.equal(side.up.weight, torch.zeros_like(side.up.weight))


@pytest.mark.parametrize("block", BLOCKS)
def test_chunked_head_loss_matches_the_models_own_loss(block):
    """causal_lm_loss's chunked LM-head path (frozen head) sees the side output: same loss and side gradients as
    the model's own forward. Tolerance 1e-5 relative: the same float32 math summed in another order."""
    model = tiny_llama()
    side = attach_ladder(model, LadderConfig(reduction=4, rank=4, block=block))
    _perturb(model)
    model.train()
    grads = []
    for fused in (True, False):
        loss = causal_lm_loss(model, _batch(), fused=fused)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in side.parameters()]))
        side.zero_grad()
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _saved_bytes(model, batch) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes (and shapes) of the tensors autograd saves for backward during one training forward."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        seen.setdefault(id(t), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in seen.values()}
    return sum(storages.values()), [tuple(t.shape) for t in seen.values()]


def test_no_backbone_activation_is_saved_for_backward():
    """saved_tensors_hooks sees every tensor autograd keeps: with a ladder, none has the backbone's MLP width
    (intermediate_size) and the total is far below LoRA's on the same batch."""
    batch = _batch(seq=48)
    lora = tiny_llama()
    lorakit.inject(lora, lorakit.LoraConfig(r=4, targets="all-linear"))
    lora.train()
    lora_bytes, lora_shapes = _saved_bytes(lora, batch)
    ladder = tiny_llama()
    attach_ladder(ladder, LadderConfig(reduction=4, rank=4, every=2))
    ladder.train()
    ladder_bytes, ladder_shapes = _saved_bytes(ladder, batch)
    inter = ladder.config.intermediate_size
    assert any(s[-1] == inter for s in lora_shapes)  # the check can fail: LoRA does keep backbone activations
    assert not any(s and s[-1] == inter for s in ladder_shapes)
    assert ladder_bytes < 0.25 * lora_bytes, (ladder_bytes, lora_bytes)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("block", BLOCKS)
def test_cached_generation_equals_uncached_with_left_padding(make, block):
    """The transformer side block keeps its own key/value cache in step with the model's; padding is masked."""
    model = make()
    attach_ladder(model, LadderConfig(reduction=4, rank=4, block=block))
    _perturb(model)
    x = ids(batch=2, seq=9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    outs = [
        model.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=c, pad_token_id=0
        )
        for c in (True, False)
    ]
    assert torch.equal(*outs)
    with torch.no_grad():  # the padded row's answer does not depend on what stands in its padding
        y = x.clone()
        y[0, :3] = 5
        a = model(input_ids=x, attention_mask=mask).logits[0, 3:]
        b = model(input_ids=y, attention_mask=mask).logits[0, 3:]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # masked keys: float noise only


@pytest.mark.parametrize("block", BLOCKS)
def test_save_load_round_trip_and_inspect(tmp_path, block, capsys):
    model = tiny_llama()
    attach_ladder(model, LadderConfig(reduction=2, rank=4, every=2, block=block, temperature=0.5))
    _perturb(model)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    path = lorakit.save_ladder(model, tmp_path / "ladder")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LADDER" and cfg["block"] == block and cfg["ladder_layers"] == [1]
    assert (path / "adapter_model.safetensors").is_file() and lorakit.is_ladder_folder(path)
    fresh = tiny_llama()
    assert lorakit.load_adapter(fresh, path) == "ladder"
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)  # bit for bit
    info = lorakit.describe_adapter(path)
    assert info["kind"] == "ladder" and info["parameters"] == sum(
        p.numel() for p in ladder_of(fresh).parameters()
    )
    from lorakit.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Ladder side network" in out and f"block={block}" in out and "not mergeable" in out
    lorakit.detach_ladder(fresh)
    with torch.no_grad():
        assert not torch.equal(fresh(x).logits, want)  # the plain base again


def test_load_refuses_a_ladder_for_another_model_and_leaves_it_unchanged(tmp_path):
    model = tiny_llama()
    attach_ladder(model, LadderConfig(reduction=4, rank=4))
    path = lorakit.save_ladder(model, tmp_path / "ladder")
    other = tiny_gpt2()
    other.transformer.h = other.transformer.h[:1]
    with pytest.raises(lorakit.AdapterError, match="trained on a model with 2 blocks"):
        lorakit.load_adapter(other, path)
    assert ladder_of(other) is None and not any(True for _ in other._forward_hooks.values())
    with pytest.raises(lorakit.AdapterError, match="already has a ladder"):
        lorakit.load_adapter(model, path)


def test_bad_input_messages(tmp_path):
    with pytest.raises(
        lorakit.TargetError, match=r"cannot find the decoder blocks of ConvNet.*model\.model\.layers"
    ):
        attach_ladder(ConvNet(), LadderConfig())
    with pytest.raises(lorakit.ConfigError, match="reduction 5 does not divide hidden size 32"):
        attach_ladder(tiny_llama(), LadderConfig(reduction=5))
    with pytest.raises(lorakit.ConfigError, match="block must be one of mlp, transformer"):
        LadderConfig(block="lstm")
    model = tiny_llama()
    attach_ladder(model, LadderConfig(reduction=4))
    with pytest.raises(lorakit.AdapterError, match="ladder adapters cannot be merged into the base"):
        lorakit.merge(model)
    path = lorakit.save_ladder(model, tmp_path / "ladder")
    from lorakit.export import merge_to_folder

    with pytest.raises(lorakit.AdapterError, match="ladder adapters cannot be merged"):
        merge_to_folder(None, path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    from lorakit.bank import AdapterBank

    lorakit.detach_ladder(model)
    attach_ladder(model, LadderConfig(reduction=4, block="transformer"))
    path = lorakit.save_ladder(model, tmp_path / "transformer")
    with pytest.raises(lorakit.AdapterError, match="transformer side blocks cannot be served"):
        AdapterBank(tiny_llama()).load("x", path)  # serving: mlp ladders only (tests/test_serve_ladder.py)


def test_train_config_method_ladder():
    from lorakit.train.config import load_config
    from lorakit.train.methods import make_method

    cfg = load_config(None, ["--method", "ladder", "--ladder.block", "transformer", "--ladder.every", "3"])
    method = make_method(cfg)
    assert method.can_merge is False and method.config.block == "transformer" and method.config.every == 3
    with pytest.raises(lorakit.ConfigError, match="ladder.every is set but train.method is 'lora'"):
        load_config(None, ["--ladder.every", "3"])
    with pytest.raises(lorakit.ConfigError, match="ladder\\+loraplus"):
        make_method(load_config(None, ["--method", "ladder+loraplus"]))
    with pytest.raises(lorakit.ConfigError, match="ladder.rank must be an int >= 1"):
        make_method(load_config(None, ["--method", "ladder", "--ladder.rank", "0"]))


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["fp32", "nf4"])
def test_run_training_with_ladder_on_a_tiny_model(tmp_path, quantize):
    """`lorakit train --method ladder` (and on an NF4 base: QLoRA + ladder) through run_training, then reload."""
    summary, model = addition_run(
        tmp_path,
        *("--method", "ladder", "--ladder.reduction", "4", "--ladder.block", "transformer"),
        *(["--model.quantize", quantize] if quantize else []),
        *("--train.lr", "1e-2", "--train.steps", "6", "--train.save_every", "3"),
    )
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert (quantize is not None) == (summary["quantization"] is not None)
    adapter = tmp_path / "run" / "adapter"
    assert lorakit.is_ladder_folder(adapter)
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()
    x = ids(seq=8)
    with torch.no_grad():
        want = model(x).logits
    fresh = tiny_llama()
    if quantize:
        lorakit.quantize(fresh, "nf4")
    lorakit.load_adapter(fresh, adapter)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)


@pytest.mark.real_model
def test_real_model_start_equals_base_then_train_save_reload_generate(tmp_path, capsys):
    """On SmolLM2-135M: logits equal the base at init; a few ladder steps through run_training; the saved adapter
    reloads bit for bit; cached generation equals uncached; `lorakit generate --adapter` runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine two OpenMP threads can be 10x slower than one
    try:
        _real_model_ladder_round_trip(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _real_model_ladder_round_trip(tmp_path, capsys) -> None:
    from lorakit.cli import main
    from lorakit.generate import generate
    from lorakit.train.config import load_config
    from lorakit.train.run import run_training

    model, tok = lorakit.load_model()
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(x).logits
    attach_ladder(model, LadderConfig(block="transformer"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)
    lorakit.detach_ladder(model)
    cfg = load_config(
        None,
        [
            *("--method", "ladder", "--ladder.block", "transformer", "--ladder.every", "3"),
            *("--train.out_dir", str(tmp_path / "run"), "--train.steps", "3", "--train.batch_size", "2"),
            *("--data.n_train", "8", "--data.n_eval", "2", "--eval.limit", "2", "--eval.max_new_tokens", "4"),
            *("--train.save_every", "0", "--train.lr", "1e-2"),
        ],
    )
    summary = run_training(cfg, model=model, tokenizer=tok)
    assert summary["after"]["loss"] != summary["before"]["loss"]
    with torch.no_grad():
        trained = model(x).logits
    assert not torch.equal(trained, base)
    lorakit.detach_ladder(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)  # the backbone is exactly as it was
    adapter = tmp_path / "run" / "adapter"
    assert lorakit.load_adapter(model, adapter) == "ladder"
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained)
    cached = generate(model, tok, "What is 2+2?", max_new_tokens=8)
    model.generation_config.use_cache = False
    assert generate(model, tok, "What is 2+2?", max_new_tokens=8) == cached
    assert main(["generate", "What is 2+2?", "--adapter", str(adapter), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == cached
