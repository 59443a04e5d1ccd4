"""Extracting an adapter from a fine-tuned model (`lorakit.extract`): base + adapter is the tuned model, in lorakit
and in PEFT.

- Changes of known low rank (on Llama, Qwen2 with q/k/v biases, GPT-2's Conv1D with biases everywhere, and a tied
  embedding) come back at exactly their rank, with norms saved whole and biases in PEFT's bias modes.
- A fine-tune of every weight by real gradient steps: the error falls as the rank grows, and the reported errors
  are those of the written factors.
- An adapter merged with `lorakit merge` comes back at its own ranks (rsLoRA, rank and alpha patterns, an
  embedding), and on the real default model too.
- Bad input, and the CLI: tests/test_extract_errors.py.

Tolerances: ΔW is rebuilt from float32 factors of a float32 SVD, so each weight differs from the tuned one by
~1e-7 relative; through the tiny models' 2 layers the logits (~1) agree to ~1e-6 on an AVX2 CPU. On an AVX-512
one the float32 kernels round otherwise, and 3 logits of 3,072 of the tied case differed by 1.15e-5: we allow
3e-5. The real model's logits (~20) through 30 layers: see that test.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.extract import RECORD_NAME, extract
from lorakit.extract_math import RTOL

from tiny import every_kind_of_lora, ids, randomize, tiny_gpt2, tiny_llama, tiny_qwen2

ATOL = 3e-5


def _tied_llama(seed: int = 0):
    return tiny_llama(seed, tied=True)


def _low_rank(shape, rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)) * scale


def _change(model, changes: dict[str, int | str]) -> None:
    """Add to each named parameter a random change: of that rank (a matrix), or "any" (a vector's)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, (name, how) in enumerate(changes.items()):
            p = params[name]
            if how == "any":
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.1)
            else:
                p.add_(_low_rank(p.shape, how, seed=i))


def _pair(tmp_path, make, changes):
    base = make()
    tuned = copy.deepcopy(base)
    _change(tuned, changes)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned", tuned


def _logits_in_both(base_dir, adapter, x):
    """Logits of base + adapter, loaded by lorakit and by PEFT."""
    from peft import PeftModel

    ours = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lorakit.load_adapter(ours, adapter)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), str(adapter))
    with torch.no_grad():
        return ours(x).logits, theirs.eval()(x).logits


ATTN0 = "model.layers.0.self_attn"
CASES = {
    # Llama: two projections and a norm
    "llama": (
        tiny_llama,
        {f"{ATTN0}.q_proj.weight": 3, "model.layers.1.mlp.down_proj.weight": 2, "model.norm.weight": "any"},
        {f"{ATTN0}.q_proj": 3, "model.layers.1.mlp.down_proj": 2},
        "none",
    ),
    # Qwen2: a projection and its bias (bias="lora_only"), and the output head
    "qwen2": (
        tiny_qwen2,
        {f"{ATTN0}.k_proj.weight": 2, f"{ATTN0}.k_proj.bias": "any", "lm_head.weight": 1},
        {f"{ATTN0}.k_proj": 2, "lm_head": 1},
        "lora_only",
    ),
    # GPT-2: Conv1D weights stored (in, out), a LayerNorm (weight and bias), and a bias whose weight did not change
    "gpt2": (
        tiny_gpt2,
        {
            "transformer.h.0.attn.c_attn.weight": 2,
            "transformer.h.1.mlp.c_fc.weight": 3,
            "transformer.h.0.ln_1.bias": "any",
            "transformer.h.1.mlp.c_proj.bias": "any",
        },
        {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_fc": 3},
        "all",
    ),
    # a tied embedding: one ΔW, a LoRA on the input embedding and one on the output head
    "tied": (
        _tied_llama,
        {"model.embed_tokens.weight": 2, f"{ATTN0}.v_proj.weight": 1},
        {"model.embed_tokens": 2, f"{ATTN0}.v_proj": 1, "lm_head": 2},
        "none",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_low_rank_changes_come_back_at_their_rank_in_lorakit_and_peft(case, tmp_path):
    make, changes, ranks, bias = CASES[case]
    base_dir, tuned_dir, tuned = _pair(tmp_path, make, changes)
    before = {f.name: f.read_bytes() for f in base_dir.iterdir()}
    done = extract(base_dir, tuned_dir, tmp_path / "ad", r=4)
    assert {m.module: m.rank for m in done.loras} == ranks
    assert done.max_error < 1e-5 and done.bias == bias and not done.left_out
    x = ids(vocab=tuned.config.vocab_size)
    with torch.no_grad():
        want = tuned(x).logits
        base = make()(x).logits
    ours, theirs = _logits_in_both(base_dir, tmp_path / "ad", x)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs, want, atol=ATOL, rtol=0)
    assert (want - base).abs().max() > 1e-2, "the changes must change the output"
    assert {f.name: f.read_bytes() for f in base_dir.iterdir()} == before, "the base is only read"
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert done.parameters == sum(t.numel() for t in tensors.values())
    tied = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["ensure_weight_tying"]
    assert tied is (case == "tied")  # the tied weight's one ΔW: a merge keeps the model tied
    if tied:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        lorakit.load_adapter(model, tmp_path / "ad")
        plain = lorakit.unload(model, merge=True)
        assert plain.lm_head.weight is plain.model.embed_tokens.weight


def test_norms_are_saved_whole_and_can_be_left_out(tmp_path):
    changes = {
        f"{ATTN0}.q_proj.weight": 2,
        "model.norm.weight": "any",
        "model.layers.0.input_layernorm.weight": "any",
    }
    base_dir, tuned_dir, _ = _pair(tmp_path, tiny_llama, changes)
    done = extract(base_dir, tuned_dir, tmp_path / "with", r=4)
    assert done.copies == ["model.layers.0.input_layernorm", "model.norm"]
    config, _ = lorakit.read_adapter(tmp_path / "with")
    assert config.modules_to_save == done.copies
    done = extract(base_dir, tuned_dir, tmp_path / "without", r=4, copy_small=False)
    assert done.copies == [] and set(done.left_out) == {"model.layers.0.input_layernorm", "model.norm"}


def _fine_tune_every_weight(model, steps: int = 5):
    """Real gradient steps on every parameter (a full fine-tune): ΔW of full rank, with a decaying spectrum."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = ids(batch=4, seq=16, seed=7)
    for _ in range(steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    return model.eval()


def test_a_full_fine_tune_error_falls_with_the_rank_and_is_reported_truly(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tuned = _fine_tune_every_weight(copy.deepcopy(base))
    tuned.save_pretrained(tmp_path / "tuned")
    x = ids(seed=11)
    with torch.no_grad():
        want = tuned(x).logits
    errors, reported = [], []
    for r in (1, 2, 4, 8, 32):  # 32 = the hidden size: full rank for every square-or-wider weight
        done = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / f"r{r}", r=r)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        lorakit.load_adapter(model, tmp_path / f"r{r}")
        with torch.no_grad():
            ours = model(x).logits  # the last one, at full rank, is checked below
        errors.append((ours - want).abs().max().item())
        reported.append(done.max_error)
        # the report is the factors' true error: rebuild ΔW of one module from the file
        q = "model.layers.1.self_attn.q_proj"
        t = load_file(tmp_path / f"r{r}" / "adapter_model.safetensors")
        rebuilt = t[f"base_model.model.{q}.lora_B.weight"] @ t[f"base_model.model.{q}.lora_A.weight"]
        delta = tuned.get_submodule(q).weight - base.get_submodule(q).weight
        true = ((delta - rebuilt).norm() / delta.norm()).item()
        rec = json.loads((tmp_path / f"r{r}" / RECORD_NAME).read_text())["modules"][q]
        assert rec["error"] == pytest.approx(true, abs=1e-5), r
    assert errors == sorted(errors, reverse=True), errors
    assert reported == sorted(reported, reverse=True) and reported[0] > 0.3, reported
    # at full rank only the singular values under RTOL·σ₁ are dropped: at most 32 of them, so the error is at most
    # RTOL·√32 (about 5.7e-4), and the logits are the tuned model's
    assert errors[-1] < ATOL and reported[-1] < RTOL * 32**0.5
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)


def test_a_randomised_svd_finds_the_same_low_rank_and_nearly_the_same_best(tmp_path):
    """Known rank: the randomised SVD (niter=2, r + 10 triplets) finds it exactly, as the full one does. A full
    fine-tune at r=4: its error is within 2 % of the optimal (full SVD) one, and the same inputs give the same
    file."""
    changes = {f"{ATTN0}.q_proj.weight": 3, "model.layers.1.mlp.up_proj.weight": 2}
    base_dir, tuned_dir, tuned = _pair(tmp_path, tiny_llama, changes)
    done = extract(base_dir, tuned_dir, tmp_path / "low", r=8, niter=2)
    assert {m.module: m.rank for m in done.loras} == {f"{ATTN0}.q_proj": 3, "model.layers.1.mlp.up_proj": 2}
    x = ids()
    with torch.no_grad():
        want = tuned(x).logits
    ours, theirs = _logits_in_both(base_dir, tmp_path / "low", x)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    _fine_tune_every_weight(tiny_llama()).save_pretrained(tmp_path / "full")
    exact = extract(base_dir, tmp_path / "full", tmp_path / "exact", r=4)
    fast = [extract(base_dir, tmp_path / "full", tmp_path / f"fast{i}", r=4, niter=2) for i in range(2)]
    best = {m.module: m.error for m in exact.loras}
    for m in fast[0].loras:
        assert best[m.module] <= m.error + 1e-4 and m.error <= 1.02 * best[m.module], (m, best[m.module])
    a, b = (load_file(tmp_path / f"fast{i}" / "adapter_model.safetensors") for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "fast0" / RECORD_NAME).read_text())["svd"] == "randomised, niter=2"


def test_energy_lowers_each_module_to_what_keeps_that_share(tmp_path):
    """q_proj's ΔW has singular values 10, 1, 0.1, 0.01 (99.0 % of Σσ² in the first, 99.99 % in two), v_proj's
    four of 1 (25 % each): energy 0.999 keeps 2 and 4; the file's rank_pattern says so, and PEFT agrees."""
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)

    def orthonormal(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, 4, generator=g))[0]

    q, v = (
        tuned.get_submodule(f"{ATTN0}.q_proj"),
        tuned.get_submodule(f"{ATTN0}.v_proj"),
    )  # (32, 32), (16, 32)
    with torch.no_grad():
        q.weight += orthonormal(32) @ torch.diag(torch.tensor([10, 1, 0.1, 0.01])) @ orthonormal(32).T
        v.weight += orthonormal(16) @ orthonormal(32).T
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    done = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", r=8, energy=0.999)
    assert {m.module: m.rank for m in done.loras} == {f"{ATTN0}.q_proj": 2, f"{ATTN0}.v_proj": 4}
    q = next(m for m in done.loras if m.module.endswith("q_proj"))
    assert q.error == pytest.approx((0.1**2 + 0.01**2) ** 0.5 / (100 + 1 + 0.01 + 0.0001) ** 0.5, rel=1e-3)
    config, _ = lorakit.read_adapter(tmp_path / "ad")
    assert config.rank_for(f"{ATTN0}.q_proj") == 2 and config.rank_for(f"{ATTN0}.v_proj") == 4
    ours, theirs = _logits_in_both(tmp_path / "base", tmp_path / "ad", ids())
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_a_merged_adapter_comes_back_at_its_own_ranks(tmp_path):
    """rsLoRA, a rank and an alpha pattern, and an embedding: merged by `lorakit merge`, extracted again."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    cfg = every_kind_of_lora()
    lorakit.inject(model, cfg, "a")
    randomize(model, std=0.1, seed=5)
    lorakit.save_adapter(model, tmp_path / "a", "a")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    merged = copy.deepcopy(base)
    lorakit.load_adapter(merged, tmp_path / "a")
    lorakit.unload(merged, merge=True).save_pretrained(tmp_path / "merged")
    done = extract(tmp_path / "base", tmp_path / "merged", tmp_path / "back", r=16)
    assert {m.module: m.rank for m in done.loras} == {
        n: cfg.rank_for(n) for n, _ in lorakit.lora_layers(model)
    }
    ours, theirs = _logits_in_both(tmp_path / "base", tmp_path / "back", x)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs, want, atol=ATOL, rtol=0)


def test_targets_leave_the_other_changes_out_and_say_so(tmp_path, caplog):
    changes = {f"{ATTN0}.q_proj.weight": 2, f"{ATTN0}.k_proj.weight": 1, "model.embed_tokens.weight": 1}
    base_dir, tuned_dir, _ = _pair(tmp_path, tiny_llama, changes)
    with caplog.at_level(logging.WARNING, logger="lorakit.extract"):
        done = extract(base_dir, tuned_dir, tmp_path / "ad", r=4, targets=["q_proj", "v_proj"])
    assert [m.module for m in done.loras] == [f"{ATTN0}.q_proj"]
    assert set(done.left_out) == {f"{ATTN0}.k_proj", "model.embed_tokens"}
    assert all(v > 0 for v in done.left_out.values())
    record = json.loads((tmp_path / "ad" / RECORD_NAME).read_text())
    assert set(record["left_out"]) == set(done.left_out)
    assert "2 changed modules are not in the adapter" in caplog.text
    config, _ = lorakit.read_adapter(tmp_path / "ad")
    assert lorakit.select_modules(tiny_llama(), config) == [f"{ATTN0}.q_proj"]
    with pytest.raises(ConfigError, match="no changed weight is in the targets"):
        extract(base_dir, tuned_dir, tmp_path / "none", targets=["v_proj"])
    assert not (tmp_path / "none").exists()


def test_sharded_checkpoints_give_the_same_adapter(tmp_path):
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    _change(tuned, {f"{ATTN0}.o_proj.weight": 2, "model.layers.1.mlp.up_proj.weight": 3})
    for kind, shard in (("whole", "1GB"), ("shards", "20KB")):
        base.save_pretrained(tmp_path / kind / "base", max_shard_size=shard)
        tuned.save_pretrained(tmp_path / kind / "tuned", max_shard_size=shard)
    assert (tmp_path / "shards" / "tuned" / "model.safetensors.index.json").is_file()
    for kind in ("whole", "shards"):
        extract(tmp_path / kind / "base", tmp_path / kind / "tuned", tmp_path / kind / "ad", r=4)
    a, b = (load_file(tmp_path / k / "ad" / "adapter_model.safetensors") for k in ("whole", "shards"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_saved_in_other_dtypes_are_warned_about(tmp_path, caplog):
    """bf16 against fp32: every weight differs by rounding, so every one becomes a LoRA, and the log says why."""
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    _change(tuned, {f"{ATTN0}.q_proj.weight": 2})
    base.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    with caplog.at_level(logging.WARNING, logger="lorakit.extract"):
        done = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", r=4)
    assert "the base holds bfloat16 and the tuned model float32" in caplog.text
    assert len(done.loras) == 2 * 7 + 2  # every projection, the embedding and the head


# -- the real default model -----------------------------------------------------------------------------------


@pytest.mark.real_model
def test_on_the_real_model_a_merged_adapter_comes_back(default_model_dir, tmp_path):
    """SmolLM2-135M with a random rank-4 LoRA on q_proj and down_proj of every block, merged:
    the extracted adapter has rank 4 everywhere and gives the merged model's logits. Logits (~20) through 30
    fp32 layers, with every weight rebuilt from an SVD of ΔW (~1e-7 relative): they differed by 5e-5; atol=5e-4."""
    model, tok = lorakit.load_model(default_model_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]), "a")
    randomize(model, std=0.02, seed=9)
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(x).logits
        with lorakit.disabled(model):
            base = model(x).logits
    lorakit.unload(model, merge=True).save_pretrained(tmp_path / "merged")
    del model
    done = extract(None, tmp_path / "merged", tmp_path / "back", r=16)
    assert len(done.loras) == 30 * 2 and {m.rank for m in done.loras} == {4}
    assert done.copies == [] and done.bias == "none" and not done.left_out
    model, _ = lorakit.load_model(default_model_dir)
    lorakit.load_adapter(model, tmp_path / "back")
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    assert (want - base).abs().max() > 0.1, "the adapter must change the output"
