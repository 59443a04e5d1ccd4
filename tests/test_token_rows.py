"""Embedding rows an adapter trains alone (PEFT's trainable_token_indices): only those rows train and are saved, a
tied output head shares them, and files go both ways with PEFT with the same logits.

Tolerance: the same float32 operations as PEFT on tiny models (logits of size ~1): 1e-5; a wrong row, a missed
tied head or an unapplied adapter moves logits by > 1e-2 (each test checks that its adapter matters).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetError
from lorakit.token_rows import TokenRows

from runs import addition_run
from tiny import (
    both_ways_with_peft,
    ids,
    inspect_stdout,
    randomize,
    snapshot,
    tiny_llama,
    unchanged,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
ROWS = [3, 5, 7]


def tied_llama():
    """tiny_llama with its output head tied to the input embedding (as SmolLM2's)."""
    cfg = LlamaConfig(**{**tiny_llama().config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _x():
    x = ids()
    x[0, :3] = torch.tensor(ROWS)  # the trained tokens occur in the input
    return x


@pytest.mark.parametrize("make", [tiny_llama, tied_llama], ids=["untied", "tied-head"])
@pytest.mark.parametrize("spec", [ROWS, {"embed_tokens": ROWS}], ids=["list", "dict"])
def test_both_ways_with_peft(make, spec, tmp_path):
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"], trainable_token_indices=spec)
    both_ways_with_peft(make, cfg, tmp_path, _x(), std=0.3)
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (3, 32) and not any("lm_head" in k for k in tensors)  # the rows, once; no embedding


def test_the_tied_head_uses_the_rows_for_those_logits_only():
    model = tied_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=ROWS))
    assert isinstance(model.lm_head, TokenRows) and model.lm_head.tied is model.model.embed_tokens
    h = torch.randn(2, 4, 32)
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].add_(1.0)
        logits = model.lm_head(h)
        plain = h @ model.lm_head.base_layer.weight.t()
    others = [i for i in range(128) if i not in ROWS]
    torch.testing.assert_close(logits[..., others], plain[..., others], atol=0, rtol=0)
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    torch.testing.assert_close(logits[..., ROWS], h @ rows.t(), atol=1e-6, rtol=0)


def test_only_the_rows_train_and_the_embedding_stays():
    model = tied_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=ROWS))
    weight = model.model.embed_tokens.base_layer.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.trainable_tokens_delta.default" in trainable
    assert not any("base_layer.weight" in n and "embed" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = _x()
    model(x, labels=x).loss.backward()
    opt.step()
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    assert torch.equal(model.model.embed_tokens.base_layer.weight, weight)
    assert not torch.equal(rows, weight[ROWS])
    report = lorakit.parameter_report(model)
    assert report["tokens"] == [
        {"module": "model.embed_tokens", "adapter": "default", "rows": 3, "params": 96, "tied": ["lm_head"]}
    ]


def test_switching_disabling_deleting_and_unloading(tmp_path):
    x = _x()
    model = tied_llama()
    with torch.no_grad():
        base = model(x).logits
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=ROWS), "a")
    lorakit.inject(model, LoraConfig(r=2, targets=["v_proj"], trainable_token_indices=[3, 9]), "b")
    lorakit.inject(model, LoraConfig(r=2, targets=["o_proj"]), "c")
    randomize(model, std=0.3)
    with torch.no_grad():
        with pytest.raises(
            AdapterError, match=r"'a' and 'b' both have their own token rows in 'model\.embed_tokens'"
        ):
            lorakit.set_active(model, ["a", "b"])
        with pytest.raises(AdapterError, match=r"token rows in 'model\.embed_tokens' .* cannot be weighted"):
            lorakit.set_active(model, {"b": 2.0})
        lorakit.set_active(model, ["a", "c"])
        active = model(x).logits
        with lorakit.row_adapters(model, ["a", "b"]):
            mixed = model(x).logits
        lorakit.set_active(model, "b")
        only_b = model(x[1:]).logits
        lorakit.set_active(model, "a")
        only_a = model(x[:1]).logits
        torch.testing.assert_close(mixed, torch.cat([only_a, only_b]), atol=ATOL, rtol=0)
        lorakit.delete_adapter(model, "b")
        lorakit.set_active(model, ["a", "c"])
        torch.testing.assert_close(model(x).logits, active, atol=0, rtol=0)
        plain = lorakit.unload(model, merge=True)
        assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
        assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied: the rows are in both
        torch.testing.assert_close(plain(x).logits, active, atol=ATOL, rtol=0)
        assert (active - base).abs().max() > 1e-2


def test_combine_carries_rows_of_one_source_and_refuses_two(tmp_path):
    model = tied_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=ROWS), "a")
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"]), "c")
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[1]), "b")
    randomize(model, std=0.3)
    for n in "abc":
        lorakit.save_adapter(model, tmp_path / n, n)
    out = lorakit.combine([tmp_path / "a", tmp_path / "c"], None, "cat", tmp_path / "ac")
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == ROWS
    fresh = tied_llama()
    lorakit.load_adapter(fresh, out)
    lorakit.set_active(model, ["a", "c"])
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=ATOL, rtol=0)
    with pytest.raises(AdapterError, match=r"trains token rows of 'model\.embed_tokens' .* and so does"):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab")
    with pytest.raises(AdapterError, match=r"cannot be weighted"):
        lorakit.combine([tmp_path / "a", tmp_path / "c"], [0.5, 1.0], "cat", tmp_path / "x")


@pytest.mark.parametrize(
    "spec,error,match",
    [
        (
            [3, 128],
            TargetError,
            r"token id 128 is out of range for 'model\.embed_tokens' \(128 rows\); resize",
        ),
        ({"nothing": [1]}, TargetError, r"trainable_token_indices: 'nothing' matches no module"),
        (
            {"norm": [1]},
            TargetError,
            r"'model\.norm' is a LlamaRMSNorm, not an embedding",
        ),
        ({"q_proj": [1]}, TargetError, r"also saved whole or adapted with LoRA"),
        ([1, 1], ConfigError, r"names token id 1 more than once"),
        ([], ConfigError, r"non-empty lists of token ids"),
    ],
    ids=["out-of-range", "no-module", "not-embedding", "lora-target", "duplicate", "empty"],
)
def test_bad_token_indices_are_refused_and_the_model_is_unchanged(spec, error, match):
    model = tied_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=spec))
    assert "\n" not in str(info.value)
    assert lorakit.adapter_names(model) == [] and unchanged(model, before)


def test_a_file_for_a_larger_vocabulary_is_refused_with_the_fix(tmp_path):
    model = tied_llama()
    model.resize_token_embeddings(130)
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[128, 129]))
    lorakit.save_adapter(model, tmp_path / "a")
    small = tied_llama()
    before = snapshot(small)
    with pytest.raises(AdapterError, match=r"token id 128 is out of range .*resize_token_embeddings"):
        lorakit.load_adapter(small, tmp_path / "a")
    assert lorakit.adapter_names(small) == [] and unchanged(small, before)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    save_file({**tensors, key: tensors[key][:1]}, str(weights))
    big = tied_llama()
    big.resize_token_embeddings(130)
    with pytest.raises(AdapterError, match=r"has shape \(1, 32\), but 2 token ids"):
        lorakit.load_adapter(big, tmp_path / "a")


def test_train_add_tokens_trains_their_rows_and_saves_the_tokenizer(tmp_path):
    """`lorakit train --data.add_tokens "<x>,<y>"`: the tokenizer grows, only the new rows train, the adapter
    folder carries the tokenizer, and PEFT loads the adapter on a base resized to it, with our logits."""
    from transformers import AutoTokenizer

    summary, model = addition_run(tmp_path, "--train.steps", "3", "--data.add_tokens", "<x>,<y>")
    adapter = tmp_path / "run" / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    new = tok.convert_tokens_to_ids(["<x>", "<y>"])
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"] == new
    assert tok("1<x>2")["input_ids"][1] == new[0]  # a special token: never split into characters
    x = torch.tensor([[5, new[0], 7, new[1]]])
    model.eval()
    with torch.no_grad():
        ours = model(x).logits
        fresh = tiny_llama()
        fresh.resize_token_embeddings(model.get_input_embeddings().weight.shape[0])
        theirs = peft.PeftModel.from_pretrained(fresh, adapter).eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_inspect_shows_the_token_rows(tmp_path):
    model = tied_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=ROWS))
    lorakit.save_adapter(model, tmp_path / "a")
    out = inspect_stdout(tmp_path / "a")
    assert "token rows (trainable_token_indices): model.embed_tokens: 3 rows x 32 (token ids 3, 5, 7)" in out


def test_add_tokens_is_checked_before_anything_loads():
    from lorakit.train.config import load_config

    with pytest.raises(
        ConfigError, match=r"data\.add_tokens trains token rows with method lora, not 'dylora'"
    ):
        load_config(None, ["--data.add_tokens", "<x>", "--train.method", "dylora"])
    with pytest.raises(ConfigError, match=r"data\.add_tokens must be distinct non-empty strings"):
        load_config(None, ["--data.add_tokens", "<x>,<x>"])
