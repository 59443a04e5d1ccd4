"""The lean causal-LM loss of `inject`ed models (lorakit.lean): the model's own forward with labels, in training,
gives transformers' loss and gradients without building the logits, in a plain loop and in transformers' Trainer.

Tolerances: the lean loss sums token losses in float64 chunk by chunk and transformers' cross_entropy reduces
in float32, so in float32 the losses agree to ~1e-6 relative (asserted at rtol 1e-5); gradients pass through
the same float32 backbone from a ∂h that differs by rounding only (asserted at atol 1e-5 on entries of ~1e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.lean import LogitsNotComputed, lean_loss_enabled

from tiny import SEVEN, randomize, tiny_gpt2, tiny_llama, tiny_qwen2

RTOL, ATOL = 1e-5, 1e-5


def _pair(make=tiny_llama, **cfg):
    """Two identical injected models: one with the lean forward, one with the model's own."""
    model = make()
    lorakit.inject(model, LoraConfig(r=4, targets=cfg.pop("targets", SEVEN), **cfg))
    randomize(model, std=0.1)
    plain = copy.deepcopy(model)
    lorakit.set_lean_loss(plain, False)
    assert lean_loss_enabled(model) and not lean_loss_enabled(plain)
    return model.train(), plain.train()


def _batch(seed: int = 1, batch: int = 3, seq: int = 12, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[1, 8:] = -100  # and padding
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2 trains with dropout: both models draw the same masks
    out = model(**kwargs)
    out.loss.backward()
    return out, _grads(model)


def _assert_same(a, b, **kwargs):
    out_a, grads_a = _run(a, **kwargs)
    out_b, grads_b = _run(b, **kwargs)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=RTOL, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=RTOL, atol=ATOL, msg=name)
    return out_a, out_b


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
def test_lean_loss_and_gradients_equal_the_models_own(make):
    lean, plain = _pair(make, targets="all-linear")
    ids, mask, labels = _batch()
    out, ref = _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out.logits, LogitsNotComputed) and ref.logits.shape == (*ids.shape, 128)


def test_num_items_in_batch_ignore_index_and_shift_labels_follow_transformers():
    lean, plain = _pair()
    ids, mask, labels = _batch()
    n = int((labels[:, 1:] != -100).sum())
    for items in (n + 5, torch.tensor(n + 5)):  # Trainer passes a tensor; custom loops an int
        _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    other = labels.masked_fill(labels == -100, -1)
    _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=other, ignore_index=-1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)


def test_positional_arguments_and_tuple_outputs():
    lean, plain = _pair()
    ids, mask, labels = _batch()
    a = lean(ids, mask, labels=labels, return_dict=False)
    b = plain(ids, mask, labels=labels, return_dict=False)
    assert isinstance(a, tuple) and isinstance(b, tuple)
    torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=0)


def test_no_learned_token_gives_a_zero_loss_connected_to_the_graph():
    lean, plain = _pair()
    ids, mask, _ = _batch()
    none = torch.full_like(ids, -100)
    out = lean(input_ids=ids, attention_mask=mask, labels=none)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.isnan(plain(input_ids=ids, attention_mask=mask, labels=none).loss)  # transformers: 0/0


def test_eval_no_grad_and_no_labels_run_the_models_own_forward():
    lean, plain = _pair()
    ids, mask, labels = _batch()
    for train, grad, lab in ((False, True, labels), (True, False, labels), (True, True, None)):
        lean.train(train), plain.train(train)
        with torch.set_grad_enabled(grad):
            a = lean(input_ids=ids, attention_mask=mask, labels=lab)
            b = plain(input_ids=ids, attention_mask=mask, labels=lab)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    # generate validates its kwargs against the forward's signature: the patch keeps it
    lean.eval()
    out = lean.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, plain.eval().generate(ids[:1, :5], max_new_tokens=3, do_sample=False))


def test_reading_the_missing_logits_says_how_to_get_them():
    lean, _ = _pair()
    ids, mask, labels = _batch()
    out = lean(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(AttributeError, match="lean=False"):
        out.logits.argmax(-1)
    with pytest.raises(TypeError, match="torch.no_grad"):
        out.logits[:, -1]
    assert not hasattr(out.logits, "dtype")  # accelerate probes outputs with hasattr


@pytest.mark.parametrize(
    "make, cfg",
    [
        (tiny_llama, {"targets": [*SEVEN, "lm_head"]}),
        (lambda: tiny_llama(tied=True), {"targets": [*SEVEN, "embed_tokens"], "ensure_weight_tying": True}),
        (tiny_llama, {"targets": [*SEVEN, "lm_head"], "use_kasa": True}),
    ],
    ids=["lora-head", "tied-head", "kasa-head"],
)
def test_a_head_with_one_lora_takes_the_lean_loss_with_its_gradients(make, cfg):
    """The chunked loss adds the head's s·(h·Aᵀ)·Bᵀ and gives A and B their gradients (a tied head's are the
    embedding's, transposed: its gradients reach the embedding's adapter; KaSA's rank-2r pair: A, B and d)."""
    ids, mask, labels = _batch()
    lean, plain = _pair(make, **cfg)
    out, _ = _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out.logits, LogitsNotComputed)


def test_a_trainable_head_a_head_with_dropout_and_soft_capping_take_the_models_own_loss():
    ids, mask, labels = _batch()
    for cfg in ({"modules_to_save": ["lm_head"]}, {"targets": [*SEVEN, "lm_head"], "dropout": 0.1}):
        lean, plain = _pair(**cfg)
        out, _ = _assert_same(lean, plain, input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.is_tensor(out.logits)
    lean, _ = _pair()
    lean.config.final_logit_softcapping = 30.0
    assert torch.is_tensor(lean(input_ids=ids, attention_mask=mask, labels=labels).logits)


def test_opt_out_unload_and_delete_restore_the_class_forward():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN), lean=False)
    assert not lean_loss_enabled(model) and "forward" not in model.__dict__
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN), "b")
    assert lean_loss_enabled(model)
    lorakit.delete_adapter(model, "default")
    assert lean_loss_enabled(model)
    lorakit.delete_adapter(model, "b")
    assert "forward" not in model.__dict__
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN))
    lorakit.unload(model)
    assert "forward" not in model.__dict__
    assert not lorakit.set_lean_loss(torch.nn.Linear(2, 2), True)  # not a causal LM: nothing to do


def test_saved_adapters_do_not_depend_on_the_lean_forward(tmp_path):
    lean, plain = _pair()
    lorakit.save_adapter(lean, tmp_path / "a")
    lorakit.save_adapter(plain, tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()


def test_transformers_trainer_trains_the_same_adapter(tmp_path):
    """Trainer passes num_items_in_batch and accumulates gradients; the lean forward must give the same adapter."""
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = _batch(batch=4)
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    results = []
    for lean in (True, False):
        model = tiny_llama()
        lorakit.inject(model, LoraConfig(r=4, targets=SEVEN), lean=lean)
        randomize(model, std=0.1)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(lean)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_lora_head_on_a_bf16_base_with_fp32_adapters():
    """A bf16 base, fp32 adapters (as `lorakit train` keeps them): the lean loss adds the head's LoRA logits in
    fp32 where the model's own forward rounds them to bf16 first. Measured: the losses agree to 1e-4 relative and
    every gradient to < 1% of its largest entry; asserted at 2% (and 1e-3 on the loss)."""
    from lorakit.device import upcast_trainable

    model = tiny_llama().to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, targets=[*SEVEN, "lm_head"]))
    upcast_trainable(model)
    randomize(model, std=0.1)
    plain = copy.deepcopy(model)
    lorakit.set_lean_loss(plain, False)
    ids, mask, labels = _batch()
    out, grads = _run(model.train(), input_ids=ids, attention_mask=mask, labels=labels)
    ref, want = _run(plain.train(), input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out.logits, LogitsNotComputed)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=0)
    for name, g in want.items():
        assert grads[name].dtype == torch.float32
        assert (grads[name] - g).abs().max() <= 0.02 * g.abs().max(), name
