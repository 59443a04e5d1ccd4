"""The walk that skips adapters' own modules (lorakit.walk), and what it buys: a load, an inject and a delete that
do the same work with 1 adapter loaded or 12, with the same trainable flags as before.

Work is counted in Python function calls (`sys.setprofile`), not timed: the count is deterministic, and a walk
into every adapter of every layer shows in it as thousands of calls per adapter loaded.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.formats import read_tensors
from lorakit.inject import set_trainable
from lorakit.walk import base_modules, base_parameters

from tiny import tiny_llama, tiny_qwen2

CONTAINERS = (".adapters.", ".modules_to_save.", ".trainable_tokens_delta.", ".lora.")


def _wrapped_model():
    """A tiny Llama with every kind of wrapper: LoRA layers, a saved head, token rows and adapted parameters."""
    model = tiny_llama()
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "a",
    )
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, alpha=4, targets=["k_proj"], trainable_token_indices=[1, 5]), "b"
    )
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, alpha=4, targets=[], target_parameters=["mlp.up_proj.weight"]), "c"
    )
    return model


def _outside_containers(name: str) -> bool:
    return not any(c in f".{name}." for c in CONTAINERS)


def test_base_modules_is_named_modules_without_the_adapters_own_in_the_same_order():
    model = _wrapped_model()
    want = [(n, m) for n, m in model.named_modules() if _outside_containers(n)]
    got = list(base_modules(model))
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want, strict=True))
    # every kind of wrapper is there, and what it leaves out is per adapter
    kinds = {type(m).__name__ for _, m in got}
    assert {"LoraLayer", "SavedModule", "TokenRows", "ParamLora"} <= kinds
    assert len(got) < len(list(model.named_modules()))


def test_base_parameters_are_the_models_own_and_the_wrappers_not_an_adapters():
    model = _wrapped_model()
    want = [n for n, _ in model.named_parameters() if _outside_containers(n)]
    assert [n for n, _ in base_parameters(model)] == want
    adapter_tensors = {id(p) for p in lorakit.adapter_parameters(model, "a")}
    assert adapter_tensors and not adapter_tensors & {id(p) for _, p in base_parameters(model)}


@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_on_a_plain_model_it_is_named_modules_shared_modules_included(remove_duplicate):
    model = tiny_llama(tied=True)
    shared = torch.nn.Linear(4, 4)
    model.model.layers[0].extra, model.model.layers[1].extra = shared, shared  # one module under two names
    want = [n for n, _ in model.named_modules(remove_duplicate=remove_duplicate)]
    assert [n for n, _ in base_modules(model, remove_duplicate=remove_duplicate)] == want
    want_p = [n for n, _ in model.named_parameters(remove_duplicate=remove_duplicate)]
    assert [n for n, _ in base_parameters(model, remove_duplicate=remove_duplicate)] == want_p
    assert "model.layers.1.extra.weight" in want_p or remove_duplicate


def _calls(fn) -> int:
    """How many Python function calls `fn()` makes (generators' resumptions included)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_a_load_and_a_delete_do_the_same_work_with_1_adapter_loaded_or_12(tmp_path):
    """Before lorakit.walk, every load walked every adapter of every layer about 50 times and set every adapter's
    trainable flags again: a load into a model holding 12 adapters made several times the calls of the first."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), "src")
    lorakit.save_adapter(model, tmp_path / "a", "src")
    lorakit.delete_adapter(model, "src")
    lorakit.load_adapter(model, tmp_path / "a", "first")
    lorakit.load_adapter(model, tmp_path / "a", "warm")  # imports and caches, out of the counts
    lorakit.delete_adapter(model, "warm")
    load_1 = _calls(lambda: lorakit.load_adapter(model, tmp_path / "a", "x"))
    delete_1 = _calls(lambda: lorakit.delete_adapter(model, "x"))
    for i in range(11):
        lorakit.load_adapter(model, tmp_path / "a", f"more{i}")
    load_12 = _calls(lambda: lorakit.load_adapter(model, tmp_path / "a", "x"))
    delete_12 = _calls(lambda: lorakit.delete_adapter(model, "x"))
    # the little that does grow: a membership test per layer per name in set_trainable's loop, none per adapter
    assert load_12 <= 1.05 * load_1, (load_1, load_12)
    assert delete_12 <= 1.05 * delete_1, (delete_1, delete_12)


def test_saving_and_merging_one_adapter_do_the_same_work_with_1_adapter_loaded_or_12(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, bias="all"), "src")
    lorakit.save_adapter(model, tmp_path / "a", "src")

    def save_and_merge():
        lorakit.save_adapter(model, tmp_path / "out", "src")
        lorakit.set_active(model, "src")
        lorakit.merge(model)
        lorakit.unmerge(model)

    save_and_merge()  # imports and caches, out of the counts
    one = _calls(save_and_merge)
    for i in range(11):
        lorakit.load_adapter(model, tmp_path / "a", f"more{i}")
    assert _calls(save_and_merge) <= 1.05 * one


def test_flags_after_loads_and_deletes_are_as_each_adapters_mark_says(tmp_path):
    model = tiny_qwen2()  # biases on q, k and v
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj"], bias="all"), "src")
    lorakit.save_adapter(model, tmp_path / "biased", "src")
    lorakit.delete_adapter(model, "src")
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj"], init="mica"), "mica", trainable=True
    )
    lorakit.load_adapter(model, tmp_path / "biased", "frozen")  # trainable=False
    model.model.norm.weight.requires_grad_(True)  # a user's change to the base, which the next inject undoes
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, alpha=4, targets=["v_proj"], bias="all"), "biased", trainable=True
    )

    def flags(name):
        return {p.requires_grad for p in lorakit.adapter_parameters(model, name)}

    layer = model.model.layers[0].self_attn.q_proj
    assert (
        layer.adapters["mica"].lora_A.requires_grad and not layer.adapters["mica"].lora_B.requires_grad
    )  # MiCA's B
    assert flags("frozen") == {False} and flags("biased") == {True}
    assert not model.model.norm.weight.requires_grad
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    base_biases = [p for n, p in base_parameters(model) if n.endswith(".bias")]
    assert base_biases and all(p.requires_grad for p in base_biases)  # a trainable adapter with bias="all"
    assert {id(p) for p in base_biases} <= {id(p) for p in biases}
    lorakit.delete_adapter(model, "biased")
    assert not any(p.requires_grad for p in base_biases)  # its biases are frozen with it
    assert flags("frozen") == {False}
    assert layer.adapters["mica"].lora_A.requires_grad and not layer.adapters["mica"].lora_B.requires_grad
    # and the flags are those a full pass computes
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model)
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_inject_zeros_starts_a_and_b_at_zero_and_a_load_gets_the_files_values(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj"]), "drawn")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj"]), "zero", zeros=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapters["drawn"].lora_A.abs().sum() > 0
    assert not layer.adapters["zero"].lora_A.any() and not layer.adapters["zero"].lora_B.any()
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, "drawn"):
            p.add_(0.1)
    lorakit.save_adapter(model, tmp_path / "a", "drawn")
    lorakit.load_adapter(model, tmp_path / "a", "loaded")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(layer.adapters["loaded"].lora_A, saved[key])


def _file_of(tmp_path, tensors):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), "a")
    path = lorakit.save_adapter(model, tmp_path / "a", "a")
    current = load_file(str(path / "adapter_model.safetensors"))
    save_file({**current, **tensors(current)}, str(path / "adapter_model.safetensors"))
    return path


def test_one_nan_among_many_tensors_is_found_and_named(tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def one_nan(current):
        t = current[key].clone()
        t[3, 1] = float("nan")
        return {key: t}

    with pytest.raises(AdapterFileError, match=rf"{key} has non-finite values"):
        read_tensors(_file_of(tmp_path, one_nan))


def test_large_finite_fp16_values_whose_norm_overflows_are_accepted(tmp_path):
    """The fused norm of a tensor of 60,000s overflows fp16; the exact check must clear it, not refuse the file."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def big(current):
        return {k: t.half() for k, t in current.items()} | {
            key: torch.full_like(current[key], 60000.0).half()
        }

    tensors = read_tensors(_file_of(tmp_path, big))
    assert torch.isinf(torch._foreach_norm([tensors[key]])[0])  # the fused pass did suspect it (torch 2.13)
    assert bool(torch.isfinite(tensors[key]).all()) and tensors[key].dtype == torch.float16
