"""ensure_weight_tying's files: they go both ways with PEFT (LoRA and saved copies, from the embedding or from the
head, on Llama and GPT-2, and on the real SmolLM2, whose merge stays one tensor); a file whose head is not its
embedding's is refused; PEFT's base embedding beside the adapter is checked; combine keeps the tie. The behaviour
on a model: tests/test_tying.py.

Tolerances: as in tests/test_tying.py (1e-5 on logits of size ~1; merged, 1e-4).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, LoraConfig
from lorakit.tying import TiedAdapter

from tiny import (
    TIE_KINDS,
    both_ways_with_peft,
    ids,
    perturb_peft,
    randomize,
    snapshot,
    tied_config,
    tied_llama,
    tiny_gpt2,
    unchanged,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
MERGED = 1e-4
KINDS = TIE_KINDS
tied, config = tied_llama, tied_config


@pytest.mark.parametrize("kind", KINDS)
def test_both_ways_with_peft(kind, tmp_path):
    both_ways_with_peft(tied, config(kind), tmp_path, ids(), std=0.3)
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    if kind.startswith("lora"):  # PEFT's layout: the head's tensors too, the embedding's transposed
        emb = "base_model.model.model.embed_tokens."
        assert torch.equal(
            tensors["base_model.model.lm_head.lora_A.weight"], tensors[emb + "lora_embedding_B"].T
        )
        assert torch.equal(
            tensors["base_model.model.lm_head.lora_B.weight"], tensors[emb + "lora_embedding_A"].T
        )
    else:
        assert torch.equal(
            tensors["base_model.model.lm_head.weight"], tensors["base_model.model.model.embed_tokens.weight"]
        )
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["ensure_weight_tying"] is True


def test_gpt2_ties_its_wte_and_head(tmp_path):
    """GPT-2's embedding is `wte`: lorakit ties it at inject and writes the head into the file's targets, so that
    PEFT (which ties by the names embed_tokens and lm_head) ties it too."""
    cfg = LoraConfig(r=4, alpha=8, targets=["c_attn", "wte"], ensure_weight_tying=True)
    model = lorakit.inject(tiny_gpt2(), cfg)
    assert isinstance(model.lm_head.adapters["default"], TiedAdapter)
    randomize(model, std=0.3)
    with torch.no_grad():
        ours = model(ids()).logits
        lorakit.save_adapter(model, tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()(ids()).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert "lm_head" in json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]


def test_a_peft_file_that_peft_does_not_tie_loads_untied(tmp_path):
    """PEFT ties only where a target or saved module is named embed_tokens or lm_head: its GPT-2 adapter on `wte`
    alone stays untied (the head keeps its weight), and lorakit loads it so, with PEFT's logits."""
    pm = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "wte"], ensure_weight_tying=True)
    )
    perturb_peft(pm, std=0.3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.eval()(ids()).logits
        pm.save_pretrained(tmp_path)
        model = tiny_gpt2()
        lorakit.load_adapter(model, tmp_path)
        torch.testing.assert_close(model(ids()).logits, theirs, atol=ATOL, rtol=0)
    assert "default" not in getattr(model.lm_head, "adapters", {})


def test_a_file_whose_head_differs_from_its_embedding_is_refused(tmp_path):
    model = lorakit.inject(tied(), config("lora-head"))
    randomize(model, std=0.3)
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lm_head.lora_A.weight"] += 0.5
    save_file(tensors, str(path))
    fresh = tied()
    before = snapshot(fresh)
    with pytest.raises(AdapterError, match=r"lm_head\.lora_A is not .*embed_tokens's transposed lora_B"):
        lorakit.load_adapter(fresh, tmp_path)
    assert unchanged(fresh, before) and "_lorakit" not in fresh.__dict__


@pytest.mark.parametrize(
    "change, refused",
    [(None, False), (lambda t: t.bfloat16(), False), (lambda t: t + 1.0, True)],
    ids=["the-models", "rounded-to-bf16", "another-vocabulary"],
)
def test_peft_base_weights_beside_an_adapted_embedding_are_checked(change, refused, tmp_path):
    """PEFT writes the base embedding beside an adapter on it (save_embedding_layers). lorakit loads the file when
    that weight is the model's, or differs from it by rounding only (a bf16 copy of a float32 model), and refuses it
    otherwise (a resized vocabulary), instead of ignoring it."""
    pm = peft.get_peft_model(
        tied(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    if change is not None:
        tensors[key] = change(tensors[key])
        save_file(tensors, str(path))
    if refused:
        with pytest.raises(AdapterError, match="save_embedding_layers"):
            lorakit.load_adapter(tied(), tmp_path)
    else:
        lorakit.load_adapter(tied(), tmp_path)


@pytest.mark.parametrize("method", ["cat", "svd", "dare_linear"])
def test_combined_tied_adapters_stay_tied(method, tmp_path):
    """Each method makes every module's A and B anew; the head's are written as the combined embedding's transpose,
    so the result loads (its head is checked against its embedding) and, for the exact `cat`, gives the sum."""
    model = tied()
    for name in ("a", "b"):
        lorakit.inject(model, config("lora-head"), name, activate=False)
    randomize(model, std=0.3)
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, name)
    lorakit.set_active(model, {"a": 0.5, "b": 0.5})
    with torch.no_grad():
        both = model(ids()).logits
    density = 0.9 if method == "dare_linear" else None
    lorakit.combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], method, tmp_path / "ab", density=density)
    written = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert written["ensure_weight_tying"] is True
    back = tied()
    lorakit.load_adapter(back, tmp_path / "ab")
    assert isinstance(back.lm_head.adapters["default"], TiedAdapter)
    if method == "cat":
        with torch.no_grad():
            torch.testing.assert_close(back(ids()).logits, both, atol=ATOL, rtol=0)


@pytest.mark.real_model
def test_real_model_both_ways_with_peft_and_merged_into_one_tensor(default_model_dir, tmp_path):
    """SmolLM2-135M ties its head to its embedding. An adapter on q_proj, v_proj and embed_tokens with
    ensure_weight_tying loads in PEFT with our logits, PEFT's loads in ours, and `lorakit merge` writes a model
    that is still tied (one 49152×576 tensor, not two) whose logits in transformers are those of our merge in
    memory (atol 1e-3: the same float32 weights; 0.0 seen) and, unmerged, ours (atol 2e-2: the adapter moves
    logits of ~40 by ~55, and float32 rounding, amplified over 30 layers, put merged and unmerged 1e-4 apart on
    one machine and 7.5e-3 on another; a wrong merge is off by the adapter's effect)."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    cfg = LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "embed_tokens"], ensure_weight_tying=True)
    torch.manual_seed(0)  # the factors' initial values, whatever ran before in this process
    lorakit.inject(model, cfg)
    randomize(model, std=0.02)
    with torch.no_grad():
        ours = model(x).logits
        with lorakit.disabled(model):
            assert (model(x).logits - ours).abs().max() > 0.1
    lorakit.save_adapter(model, tmp_path / "a")
    fresh, _ = lorakit.load_model(default_model_dir)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=2e-3, rtol=0)
    pm = peft.get_peft_model(
        lorakit.load_model(default_model_dir)[0],
        peft.LoraConfig(
            **{k: v for k, v in cfg.to_peft_dict().items() if k not in ("peft_type", "inference_mode")}
        ),
    )
    perturb_peft(pm, std=0.02)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pm.eval()(x).logits
        pm.save_pretrained(tmp_path / "p")
        back, _ = lorakit.load_model(default_model_dir)
        lorakit.load_adapter(back, tmp_path / "p")
        torch.testing.assert_close(back(x).logits, want, atol=2e-3, rtol=0)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "merge",
            "--model",
            str(default_model_dir),
            "--adapter",
            str(tmp_path / "a"),
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True
    keys = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        from_file = merged(x).logits
        lorakit.merge(model)
        torch.testing.assert_close(from_file, model(x).logits, atol=1e-3, rtol=0)
        torch.testing.assert_close(from_file, ours, atol=2e-2, rtol=0)
