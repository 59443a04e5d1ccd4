"""ensure_weight_tying (PEFT's): on a model whose output head shares the input embedding's weight, an adapter on
either gives both one update: a LoRA lives on the embedding and the head's is its transpose; a module saved whole
is one copy. Merging keeps the model tied, training computes the tied gradient; files: tests/test_tying_files.py.

Tolerance: the same float32 operations as PEFT on tiny models (logits of size ~1): 1e-5; an adapter missing from
the head, or a head with an update of its own, moves the logits by > 1e-2 (each test checks that its adapter
matters). Merging and unmerging round the weights once more, on logits up to ~30 with the random adapters of
std 0.3: 1e-4 (a relative 3e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import lorakit
from lorakit import LoraConfig, TargetError
from lorakit.tying import TiedAdapter

from tiny import (
    TIE_KINDS,
    each_row_alone,
    ids,
    randomize,
    served_as_offline,
    snapshot,
    tied_config,
    tied_llama,
    tiny_llama,
    unchanged,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
MERGED = 1e-4
KINDS = TIE_KINDS
tied, config = tied_llama, tied_config


@pytest.mark.parametrize("kind", KINDS)
def test_one_update_for_both_and_merging_keeps_the_tie(kind):
    model = lorakit.inject(tied(), config(kind))
    randomize(model, std=0.3)
    x = ids()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "q_proj" not in n]
    assert trainable and all("embed_tokens" in n for n in trainable), trainable  # the head owns nothing
    with torch.no_grad():
        out = model(x).logits
        with lorakit.disabled(model):
            assert (model(x).logits - out).abs().max() > 1e-2
        if kind.startswith("lora"):
            head = model.lm_head.adapters["default"]
            assert isinstance(head, TiedAdapter)
            emb = model.model.embed_tokens
            delta_e = lorakit.layers.delta_weight(emb, emb.adapters["default"])
            torch.testing.assert_close(
                lorakit.layers.delta_weight(model.lm_head, head), delta_e, atol=0, rtol=0
            )
        lorakit.merge(model)
        torch.testing.assert_close(model(x).logits, out, atol=MERGED, rtol=0)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(x).logits, out, atol=MERGED, rtol=0)
        plain = lorakit.unload(model, merge=True)
        assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings
        torch.testing.assert_close(plain(x).logits, out, atol=MERGED, rtol=0)


def _merges_untied_and_exact(model):
    """unload(merge=True) gives the head its own weight (the config says untied) and the unmerged logits."""
    with torch.no_grad():
        out = model(ids()).logits
        plain = lorakit.unload(model, merge=True)
        assert (
            plain.lm_head.weight is not plain.model.embed_tokens.weight
            and not plain.config.tie_word_embeddings
        )
        torch.testing.assert_close(plain(ids()).logits, out, atol=MERGED, rtol=0)


def test_without_the_setting_each_gets_its_own_update_and_merging_unties(recwarn):
    model = lorakit.inject(tied(), LoraConfig(r=4, alpha=8, targets=["q_proj", "embed_tokens"]))
    assert any("ensure_weight_tying=True" in str(w.message) for w in recwarn)
    randomize(model, std=0.3)
    _merges_untied_and_exact(model)


def test_the_gradient_is_that_of_the_one_tied_weight():
    """The embedding's A and B get the gradient of W + ΔE used as both input embedding and output head (computed
    here by functional_call on the plain tied model)."""
    cfg = config("lora-embedding", dropout=0.0)
    model = lorakit.inject(tied(), cfg)
    randomize(model, std=0.3)
    x = ids()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    emb = model.model.embed_tokens.adapters["default"]
    q = {
        n: a for n, a in ((n, layer.adapters["default"]) for n, layer in lorakit.registry.lora_layers(model))
    }
    plain = tied().train()
    A, B = emb.lora_A.detach().clone().requires_grad_(), emb.lora_B.detach().clone().requires_grad_()
    w = plain.model.embed_tokens.weight
    weights = {"model.embed_tokens.weight": w + emb.scaling * (B @ A).T}
    for n, a in q.items():  # q_proj's adapters folded in (no gradient needed there)
        if n.endswith("q_proj"):
            base = plain.get_submodule(n).weight
            weights[n + ".weight"] = base + a.scaling * (a.lora_B @ a.lora_A).detach()
    loss = functional_call(
        plain, weights, args=(), kwargs={"input_ids": x, "labels": x}, tie_weights=True
    ).loss
    loss.backward()
    torch.testing.assert_close(emb.lora_A.grad, A.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(emb.lora_B.grad, B.grad, atol=1e-6, rtol=1e-4)


def test_a_copy_and_a_move_keep_the_head_a_view_of_its_own_embedding():
    model = lorakit.inject(tied(), config("lora-head"))
    randomize(model, std=0.3)
    twin = copy.deepcopy(model).to(torch.float64)
    assert twin.lm_head.adapters["default"].source is twin.model.embed_tokens
    with torch.no_grad():
        before = model(ids()).logits
        twin.model.embed_tokens.adapters["default"].lora_A.zero_()  # the twin's head loses its update too
        assert twin.lm_head.adapters["default"].lora_B.abs().max() == 0
        torch.testing.assert_close(model(ids()).logits, before, atol=0, rtol=0)


def test_mixed_batches_equal_each_row_alone():
    model = tied()
    for name, seed in (("a", 3), ("b", 4)):
        lorakit.inject(model, config("lora-embedding"), name)
        randomize(model, std=0.3, seed=seed)
    x = ids(batch=3)
    rows = ["a", None, "b"]
    alone = each_row_alone(model, x, rows)
    with torch.no_grad(), lorakit.row_adapters(model, rows):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)
    assert (alone[0] - alone[2]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(use_dora=True), "plain LoRA"),
        (dict(init="pissa"), "init='pissa'"),
        (dict(rank_pattern={"lm_head": 2}), "rank_pattern"),
        (dict(modules_to_save=["lm_head"]), "not both"),
    ],
    ids=["dora", "pissa", "rank-pattern", "lora-and-saved"],
)
def test_what_cannot_be_tied_is_refused_and_the_model_left_as_it_was(kw, words):
    model = tied()
    before = snapshot(model)
    with pytest.raises(TargetError, match="ensure_weight_tying") as e:
        lorakit.inject(model, config("lora-embedding", **kw))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert unchanged(model, before) and "_lorakit" not in model.__dict__
    assert (
        type(model.lm_head).__name__ == "Linear" and model.lm_head.weight is model.model.embed_tokens.weight
    )


@pytest.mark.parametrize(
    "make, targets, words",
    [
        (tiny_llama, ["q_proj", "embed_tokens"], "does not tie its output head"),
        (tied, ["q_proj"], "neither adapts nor saves"),
    ],
    ids=["untied-model", "untouched"],
)
def test_nothing_to_tie_warns_and_injects(make, targets, words):
    model = make()
    with pytest.warns(UserWarning, match=words):
        lorakit.inject(model, LoraConfig(r=4, targets=targets, ensure_weight_tying=True))
    assert "default" in lorakit.adapter_names(model)


def test_served_beside_other_adapters_as_offline_generation(tmp_path, one_thread):
    """`lorakit serve`'s engine: rows of a tied adapter, a plain adapter and the base in one batch each give offline
    greedy generation's tokens (the bank loads the tied adapter as load_adapter does)."""
    model = tied()
    lorakit.inject(model, config("lora-embedding"), "t")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), "p")
    randomize(model, std=0.3)
    for name in ("t", "p"):
        lorakit.save_adapter(model, tmp_path / name, name)
    served_as_offline(tied, tmp_path, ["t", "p", None])


@pytest.mark.parametrize("kind", ["lora-embedding", "saved-head"])
def test_the_report_counts_the_one_weight_once(kind):
    model = lorakit.inject(tied(), config(kind))
    report = lorakit.parameter_report(model)
    counted = sum(report["adapters"].values())
    assert counted == report["trainable"]  # the head's LoRA or copy adds nothing of its own
    if kind.startswith("lora"):
        head = next(row for row in report["layers"] if row["module"] == "lm_head")
        assert head["tied"] and head["full"] == head["lora"] == 0
        assert "lm_head" in lorakit.format_report(report) and "ensure_weight_tying" in lorakit.format_report(
            report
        )


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Checkpoints hold the embedding's A and B once, with their optimizer state; a resumed run ties the head
    again and ends where the uninterrupted run ends (1e-6)."""
    from runs import resumed_equals_uninterrupted

    full, resumed = resumed_equals_uninterrupted(tmp_path, config("lora-head"), data_init=False, make=tied)
    assert isinstance(resumed.lm_head.adapters["default"], TiedAdapter)
    assert lorakit.adapter_state_dict(full)["base_model.model.lm_head.lora_A.weight"].abs().max() > 0


def test_merging_beside_an_untied_adapter_unties_and_stays_exact(recwarn):
    """A tied adapter and an untied one on the same embedding, both active: the head's update is the tied one's
    only, so the merge gives the head its own weight (with the warning) and merges each update where it belongs."""
    model = tied()
    lorakit.inject(model, config("lora-embedding"), "t")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens"]), "u")
    randomize(model, std=0.3)
    lorakit.set_active(model, ["t", "u"])
    _merges_untied_and_exact(model)


def test_deleting_tied_adapters_gives_the_tied_model_back_and_a_copy_over_lora_is_refused():
    model = tied()
    before = snapshot(model)
    lorakit.inject(model, config("lora-head"), "a")
    lorakit.inject(model, config("lora-embedding"), "c", activate=False)
    randomize(model, std=0.3)
    lorakit.delete_adapter(model, "a")
    assert list(model.lm_head.adapters) == ["c"]
    with pytest.raises(TargetError, match="holds other adapters' LoRA") as e:
        lorakit.inject(model, config("saved-embedding"), "b")
    assert "\n" not in str(e.value) and lorakit.adapter_names(model) == ["c"]
    lorakit.delete_adapter(model, "c")
    assert unchanged(model, before) and model.lm_head.weight is model.model.embed_tokens.weight
