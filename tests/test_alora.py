"""Activated LoRA (`LoraConfig(alora_invocation_tokens=...)`, PEFT's aLoRA, `lorakit.variants.alora`): the adapter
acts from the last occurrence of its invocation on, exactly where PEFT's does; files both ways with PEFT; greedy
generation equal to PEFT's; a base model's KV cache of the text before the invocation reused as is; mixed batches;
training; and every refusal (merge, llama.cpp, mismatched combines, bad configs) in one line, the model left as it
was. Serving: tests/test_serve_alora.py.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.variants import calculate_alora_offsets

import lorakit
from lorakit import LoraConfig
from lorakit.data.jsonl import DataError
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.export import merged_model
from lorakit.memory import enable_checkpointing
from lorakit.variants.alora import Activation, invocation_mask

from runs import addition_run
from tiny import both_ways_with_peft, ids, randomize, snapshot, tiny_gpt2, tiny_llama, unchanged

pytestmark = pytest.mark.usefixtures("one_thread")

INV = [5, 6, 7]
CFG = LoraConfig(r=4, alpha=8, targets="all-linear", alora_invocation_tokens=INV, task_type="CAUSAL_LM")


def _rows() -> torch.Tensor:
    """Three rows: the invocation once, twice (the last counts), never."""
    x = ids(batch=3, seq=14)
    x[x < 8] += 8  # no accidental invocation tokens
    x[0, 4:7] = torch.tensor(INV)
    x[1, 2:5] = x[1, 9:12] = torch.tensor(INV)
    return x


def _hooks(model) -> int:
    """How many aLoRA hooks the model's decoder has."""
    return sum(isinstance(getattr(h, "__self__", None), Activation) for h in model.model._forward_pre_hooks.values())


def _trained(cfg: LoraConfig = CFG, make=tiny_llama, name: str = "default"):
    model = make()
    lorakit.inject(model, cfg, name)
    randomize(model)
    return model


def test_mask_is_peft_offsets():
    """invocation_mask equals the mask PEFT builds from its alora_offsets (positions >= T - offset), on rows with
    the invocation once, twice, at the very end, cut off at the end, and never."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 40, (6, 12), generator=g)
    x[0, 0:3] = x[1, 3:6] = x[1, 7:10] = x[2, 9:12] = torch.tensor(INV)
    x[3, 10:12] = torch.tensor(INV[:2])  # only the start of it
    x[5, 0:3] = x[5, 3:6] = torch.tensor(INV)  # back to back
    config = {"default": peft.LoraConfig(alora_invocation_tokens=INV)}
    offsets = calculate_alora_offsets(config, "default", x)
    want = torch.stack(
        [torch.arange(12) >= 12 - o if o is not None else torch.zeros(12, dtype=torch.bool) for o in offsets]
    )
    assert torch.equal(invocation_mask(x, 12, tuple(INV)), want)
    assert want[0].all() and not want[3].any() and not want[4].any() and want[2].sum() == 3
    # the last `chunk` positions of a longer history
    assert torch.equal(invocation_mask(x, 5, tuple(INV)), want[:, -5:])
    assert not invocation_mask(x[:, :2], 2, tuple(INV)).any()  # shorter than the invocation


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_files_both_ways_with_peft(make, tmp_path):
    """Our file in PEFT, PEFT's in ours: the same logits on rows with and without the invocation (atol 1e-5:
    float32 sums of the same products in another order)."""
    x = _rows()
    both_ways_with_peft(make, CFG, tmp_path, x)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == INV


def test_tokens_before_the_invocation_see_the_base_alone():
    model = _trained()
    x = _rows()
    with torch.no_grad():
        ours = model(x).logits
        with lorakit.disabled(model):
            base = model(x).logits
    moved = (ours - base).abs().amax(-1)  # (rows, tokens)
    assert torch.equal(moved[0, :4], torch.zeros(4)) and (moved[0, 4:] > 1e-3).all()
    assert torch.equal(moved[1, :9], torch.zeros(9)) and (moved[1, 9:] > 1e-3).all()  # the last occurrence counts
    assert torch.equal(moved[2], torch.zeros(14))  # no invocation: the base model


def test_greedy_generation_equals_peft(tmp_path):
    """A left-padded batch, the invocation at the end of one prompt and in the middle of the other: the same
    tokens as PEFT's generate (whose offsets come from the prompt, as ours)."""
    model = _trained()
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    x = _rows()[:2, :9].clone()
    x[0, 6:9] = torch.tensor(INV)
    x[1, :2] = 0  # left padding
    mask = (x != 0).long()
    ours = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = theirs.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, want)
    with lorakit.disabled(model):
        base = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(ours, base)


def test_the_base_models_cache_before_the_invocation_is_reused():
    """aLoRA's point: the base model prefills the conversation; the adapter continues from that KV cache with the
    invocation and what follows, and gets the logits of a full aLoRA forward (atol 1e-5). Also when the cache
    comes from a forward the hook never saw (another batch): the invocation is then found in the new tokens."""
    model = _trained()
    x = _rows()[:1].clone()
    x[0, 9:12] = torch.tensor(INV)
    with torch.no_grad():
        full = model(x).logits
        with lorakit.disabled(model):
            cache = model(x[:, :9], use_cache=True).cache
        rest = model(x[:, 9:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(rest, full[:, 9:], atol=1e-5, rtol=0)
        # a cache from a model call on a batch of another size: the hook never saw it filled
        with lorakit.disabled(model):
            cache = model(x[:, :9], use_cache=True).cache
            model(ids(batch=2, seq=5))
        rest = model(x[:, 9:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(rest, full[:, 9:], atol=1e-5, rtol=0)


def test_mixed_batches_equal_each_row_alone():
    """An aLoRA adapter, a plain one and the base in one batch (lorakit.row_adapters): each row's logits are
    its own forward's (atol 1e-5)."""
    model = _trained()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), "plain")
    randomize(model, seed=5)
    x = _rows()
    names = ["default", "plain", None]
    with torch.no_grad(), lorakit.row_adapters(model, names):
        mixed = model(x).logits
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    alone = model(x[i : i + 1]).logits
            else:
                lorakit.set_active(model, name)
                alone = model(x[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    with torch.no_grad(), lorakit.row_adapters(model, ["default", "default", "default"]):
        torch.testing.assert_close(model(x).logits[2], mixed[2], atol=1e-5, rtol=0)  # row 2 has no invocation


def test_gradients_flow_only_from_the_invocation_on():
    """Training: a row without the invocation gives the adapter no gradient; with gradient checkpointing the
    gradients are those without (atol 1e-6: the same products recomputed)."""
    model = _trained()
    model.train()
    x = _rows()
    model(x[2:], labels=x[2:]).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in lorakit.adapter_parameters(model))
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert plain and any(g.abs().max() > 0 for g in plain.values())
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model)
    model.config.use_cache = False
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=0)


def test_merging_is_refused_and_the_model_kept():
    model = _trained()
    before = snapshot(model)
    for action in (lorakit.merge, lambda m: lorakit.unload(m, merge=True)):
        with pytest.raises(AdapterError, match="cannot merge aLoRA adapter 'default'") as info:
            action(model)
        assert "\n" not in str(info.value) and unchanged(model, before)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), "plain")  # an inactive aLoRA adapter
    lorakit.set_active(model, "plain")  # does not stop a merge of the others
    lorakit.merge(model)
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "plain")
    lorakit.set_active(model, "default")
    lorakit.unload(model, merge=False)  # the last aLoRA adapter gone: the hook goes at the next forward
    model(ids())
    assert "_lorakit_alora" not in model.__dict__ and _hooks(model) == 0


def test_a_deep_copy_has_its_own_hook():
    """copy.deepcopy of the model: the copy's aLoRA works on its own, and removing its adapter leaves the
    original's hook in place."""
    import copy

    model = _trained()
    twin = copy.deepcopy(model)
    x = _rows()
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, model(x).logits, atol=0, rtol=0)
        lorakit.unload(twin, merge=False)
        twin(x)
        assert _hooks(twin) == 0 and _hooks(model) == 1
        with lorakit.disabled(model):
            base = model(x).logits
        assert (model(x).logits - base).abs().max() > 1e-3


def test_banks_take_it_llama_cpp_and_lorakit_merge_refuse_it_and_combines(tmp_path):
    model = _trained()
    lorakit.save_adapter(model, tmp_path / "a")
    bank = lorakit.AdapterBank(tiny_llama())  # served (tests/test_serve_alora.py)
    bank.load("a", tmp_path / "a")
    assert bank.names() == ["a"]
    with pytest.raises(ConfigError, match="has no llama.cpp form"):
        lorakit.export_gguf(tmp_path / "a.gguf", tmp_path / "a")
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(AdapterError, match="cannot merge aLoRA"):
        merged_model(tmp_path / "no-such-model", tmp_path / "a")  # lorakit merge: before any load
    other = _trained(CFG.replace(alora_invocation_tokens=[9, 9]))
    lorakit.save_adapter(other, tmp_path / "b")
    with pytest.raises(AdapterError, match="invoked by the same tokens"):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab")
    assert not (tmp_path / "ab").exists()
    # the same invocation: combined, and the result keeps it (½ΔW + ½ΔW = ΔW, acting from the invocation on)
    lorakit.combine([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], "cat", tmp_path / "aa")
    assert json.loads((tmp_path / "aa" / "adapter_config.json").read_text())["alora_invocation_tokens"] == INV
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "aa")
    x = _rows()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alora_invocation_tokens=[]), "non-empty list of token ids"),
        (dict(alora_invocation_tokens=[1, -2]), "non-empty list of token ids"),
        (dict(alora_invocation_tokens="hi"), "non-empty list of token ids"),
        (dict(alora_invocation_tokens=[1], use_dora=True), "does not work with use_dora"),
        (dict(alora_invocation_tokens=[1], lora_bias=True), "does not work with lora_bias"),
        (dict(alora_invocation_tokens=[1], init="pissa"), "does not work with init='pissa'"),
        (dict(alora_invocation_tokens=[1], targets=[], target_parameters=["q_proj.weight"]), "target_parameters"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_embeddings_and_encoder_decoders_are_refused_untouched():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match="aLoRA adapts linear layers only"):
        lorakit.inject(model, CFG.replace(targets=["q_proj", "embed_tokens"]))
    assert unchanged(model, before) and lorakit.adapter_names(model) == []
    model.config.is_encoder_decoder = True
    with pytest.raises(TargetError, match="decoder-only"):
        lorakit.inject(model, CFG)
    assert lorakit.adapter_names(model) == [] and _hooks(model) == 0


def test_inputs_embeds_run_the_base_and_warn():
    model = _trained()
    x = _rows()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(x)
        with pytest.warns(UserWarning, match="cannot find the invocation"):
            ours = model(inputs_embeds=embeds).logits
        with lorakit.disabled(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = model(inputs_embeds=embeds).logits
    assert torch.equal(ours, base)


def test_lorakit_train_with_an_invocation(tmp_path):
    """`--data.alora_invocation "+1="`: the tokenizer gives the ids, every example has them before its answer,
    the run learns, and the saved adapter is an aLoRA one."""
    summary, model = addition_run(tmp_path, "--data.alora_invocation", "+1=", "--lora.r", "4")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] and len(saved["alora_invocation_tokens"]) == 3
    with pytest.raises(DataError, match="no training example has the aLoRA invocation"):
        (tmp_path / "x").mkdir()
        addition_run(tmp_path / "x", "--data.alora_invocation", "zz")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--data.alora_invocation", "a", "--train.method", "dylora"], "works with method lora"),
        (["--data.alora_invocation", "a", "--lora.alora_invocation_tokens", "[1]"], "not both"),
        (["--data.alora_invocation", "[1]"], "expected a string"),
        (["--data.alora_invocation", "a", "--data.pack", "true"], "data.pack does not work with aLoRA"),
    ],
)
def test_train_config_refusals(overrides, match):
    from lorakit.train.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_blank_invocation_is_refused(tmp_path):
    from lorakit.train.config import load_config

    (tmp_path / "run.yaml").write_text('data:\n  alora_invocation: "  "\n')
    with pytest.raises(ConfigError, match="non-empty string"):
        load_config(tmp_path / "run.yaml", [])


@pytest.mark.real_model
def test_real_model_in_peft_and_its_base_cache(default_model_dir, tmp_path):
    """SmolLM2 with an aLoRA adapter invoked by "<|im_start|>assistant": PEFT loads it with our logits, and the
    base model's cache of the user turn serves the adapter's continuation (atol 2e-3: logits ~40, f32 sums)."""
    model, tok = lorakit.load_model(default_model_dir)
    invocation = tok.encode("<|im_start|>assistant", add_special_tokens=False)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False, add_generation_prompt=True)
    x = tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = max(i for i in range(x.shape[1]) if x[0, i : i + len(invocation)].tolist() == invocation)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", alora_invocation_tokens=invocation))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ours = model(x).logits
        with lorakit.disabled(model):
            base = model(x).logits
            cache = model(x[:, :start], use_cache=True).cache
        assert torch.equal(ours[:, :start], base[:, :start]) and (ours[:, start:] - base[:, start:]).abs().max() > 0.1
        torch.testing.assert_close(model(x[:, start:], cache=cache).logits, ours[:, start:], atol=2e-3, rtol=0)
    lorakit.save_adapter(model, tmp_path / "a")
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=2e-3, rtol=0)
