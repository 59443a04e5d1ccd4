"""KaSA (PEFT's kasa_config): W0 without its r smallest singular components, plus s·B·diag(d)·A. Files go both ways
with PEFT with the same logits, and PEFT's merged model is ours; unlike PEFT, W0 stays as it was (the dropped part
is subtracted beside the update), so disabling, deleting, switching and mixed batches are exact; training adds
the regulariser PEFT's `_get_kasa_loss` computes; what cannot be built is refused in one line, the model as it was.

Tolerance: the same float32 operations as PEFT on tiny models (logits of size ~1): 1e-5, each test checking that
its adapter moves the logits by far more; where one side multiplies a rebuilt W0 − U_d·S_d·Vh_d (PEFT, merging)
and the other subtracts the factors' product beside W0: 1e-4 (float32 rounding of a 32-wide SVD, logits ~10).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetError
from lorakit.layers import Variant
from lorakit.train.config import RunConfig
from lorakit.train.methods import Method
from lorakit.variants.kasa import KasaVariant

from runs import addition_run, resumed_equals_uninterrupted
from tiny import (
    SEVEN,
    both_ways_with_peft,
    each_row_alone,
    graph_names,
    ids,
    inspect_stdout,
    peft_config,
    randomize,
    refused_untouched,
    served_as_offline,
    tiny_llama,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL, REBUILT = 1e-5, 1e-4


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "targets": SEVEN, "use_kasa": True, **kw})


def truncated_logits(model, x: torch.Tensor, r: int, targets=SEVEN, layers=None) -> torch.Tensor:
    """The plain model's logits with each target's weight (in `layers`, None: all) replaced by its rank-(k − r) SVD
    approximation, built here from torch.linalg.svd (the paper's and PEFT's truncation)."""
    weights = {}
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if layers is not None and not any(f".layers.{i}." in name for i in layers):
            continue
        if name.endswith(".weight") and any(module.endswith(t) for t in targets):
            u, s, vh = torch.linalg.svd(p.detach(), full_matrices=False)
            k = s.shape[0] - r
            weights[name] = (u[:, :k] * s[:k]) @ vh[:k]
    with torch.no_grad():
        return functional_call(model, weights, (x,)).logits


def test_a_new_adapter_is_the_truncated_model_and_disabling_it_is_the_base():
    model = tiny_llama()
    x = ids()
    want = truncated_logits(model, x, r=4)
    with torch.no_grad():
        base = model(x).logits
    lorakit.inject(model, config())
    with torch.no_grad():
        ours = model(x).logits
        torch.testing.assert_close(ours, want, atol=REBUILT, rtol=0)
        assert (ours - base).abs().max() > 1e-2
        with lorakit.disabled(model):
            assert torch.equal(model(x).logits, base)  # W0 was never touched
    lorakit.delete_adapter(model, "default")
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("targets", [SEVEN, ["q_proj", "down_proj"]], ids=["seven", "two"])
def test_both_ways_with_peft(targets, tmp_path):
    both_ways_with_peft(tiny_llama, config(targets=targets), tmp_path, ids(), std=0.3)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["kasa_config"] == {"beta": 1e-4, "gamma": 1e-3}
    back = LoraConfig.from_peft_dict(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    assert back.use_kasa and back.kasa_beta == 1e-4 and back.kasa_gamma == 1e-3


def test_merging_gives_peft_merged_model_and_unmerging_gives_w0_back(tmp_path):
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    x = ids()
    w0 = model.model.layers[0].mlp.down_proj.base_layer.weight.detach().clone()
    with torch.no_grad():
        ours = model(x).logits
    lorakit.save_adapter(model, tmp_path)
    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours, atol=REBUILT, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload()
    w_peft = theirs.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(
        model.model.layers[0].mlp.down_proj.base_layer.weight, w_peft, atol=1e-5, rtol=0
    )
    lorakit.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_it_sits_beside_other_adapters_switching_and_mixing_exactly():
    """PEFT's truncation of W0 in place keeps KaSA from sitting beside other adapters; here each sees W0."""
    model = tiny_llama()
    x = ids(batch=3)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN), "plain")
    randomize(model, std=0.3)
    with torch.no_grad():
        plain = model(x).logits
    lorakit.inject(model, config(), "kasa")
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.adapters["kasa"].lora_B.normal_(std=0.3)
        assert (model(x).logits - plain).abs().max() > 1e-2
        lorakit.set_active(model, "plain")
        assert torch.equal(model(x).logits, plain)
    rows = ["kasa", None, "plain"]
    alone = each_row_alone(model, x, rows)
    with torch.no_grad(), lorakit.row_adapters(model, rows):
        mixed = model(x).logits
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)
    lorakit.delete_adapter(model, "kasa")
    lorakit.set_active(model, "plain")
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)


def test_dropout_leaves_the_dropped_part_alone():
    """With dropout on A's input in training, the truncation (part of the layer's weight) still sees the whole input:
    a fresh adapter (B = 0) computes the truncated model whatever the mask."""
    model = tiny_llama()
    x = ids()
    want = truncated_logits(model, x, r=4)
    lorakit.inject(model, config(dropout=0.9))
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=REBUILT, rtol=0)


def test_the_fused_kernels_run_it_with_the_generic_paths_gradients():
    """The rank-2r factors [A; Vh_d], [B·diag(d), −U_d·S_d/s] go through the fused LoRA kernels; their gradients
    reach A, B and d: the same loss and gradients as the generic path (float32, 1e-5 relative)."""
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    model.train()
    x = ids()

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss, graph_names(loss), grads

    loss, names, grads = run()
    before = lorakit.set_fused(False)
    try:
        plain_loss, plain_names, plain = run()
    finally:
        lorakit.set_fused(before)
    assert "_LoraLinearBackward" in names and "_LoraLinearBackward" not in plain_names
    assert any("lora_diag" in n for n in plain) and all(g.abs().max() > 0 for g in plain.values())
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for n, g in plain.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_the_regulariser_is_peft_kasa_loss(tmp_path):
    model = lorakit.inject(tiny_llama(), config(kasa_beta=0.5, kasa_gamma=0.25))
    randomize(model, std=0.3)
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.kasa_loss(model)  # beta and gamma: the adapter's own
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).base_model._get_kasa_loss()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    torch.testing.assert_close(lorakit.kasa_loss(model, beta=0.5, gamma=0.25), ours, rtol=0, atol=0)
    assert lorakit.kasa_loss(lorakit.inject(tiny_llama(), LoraConfig(r=4, targets=SEVEN))) is None


def test_the_training_loss_follows_the_model_not_the_run_config():
    """The loop's default method adds the regulariser of the KaSA adapters the model trains, with their own weights,
    whatever its run config says (a model injected by hand, then given to train_loop); frozen KaSA adapters and
    plain ones add nothing."""
    method = Method(RunConfig())  # its lora section: plain LoRA
    model = lorakit.inject(tiny_llama(), config(kasa_beta=0.5, kasa_gamma=0.25))
    randomize(model, std=0.3)
    extra = method.extra_loss(model)
    torch.testing.assert_close(extra, lorakit.kasa_loss(model, beta=0.5, gamma=0.25), rtol=0, atol=0)
    assert float(extra) > 1.1 * float(lorakit.kasa_loss(model, beta=1e-4, gamma=1e-3))  # not the defaults
    assert method.extra_loss(lorakit.inject(tiny_llama(), config(), trainable=False)) is None
    assert method.extra_loss(lorakit.inject(tiny_llama(), LoraConfig(r=4, targets=SEVEN))) is None
    assert method.extra_loss(lorakit.inject(tiny_llama(), config(kasa_beta=0, kasa_gamma=0))) is None  # no work


def test_lorakit_train_learns_with_it_and_its_regulariser_acts(tmp_path):
    def diag_norm(model):
        return sum(float(p.norm()) for n, p in model.named_parameters() if "lora_diag" in n)

    common = ("--lora.use_kasa", "true", "--lora.r", "4", "--train.steps", "30", "--train.lr", "5e-3")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    summary, model = addition_run(tmp_path / "a", *common, "--lora.kasa_beta", "0")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    written = json.loads((tmp_path / "a" / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["kasa_config"] == {"beta": 0.0, "gamma": 0.001}
    assert isinstance(model.model.layers[1].mlp.down_proj.adapters["default"].variant, KasaVariant)
    _, pulled = addition_run(tmp_path / "b", *common, "--lora.kasa_beta", "5")  # Σ d² weighs: d shrinks
    assert diag_norm(pulled) < diag_norm(model) - 1.0  # both start from the same d (seen: 25.0 against 27.3)


def test_saved_plain_it_is_lora_of_rank_2r_that_loads_without_kasa(tmp_path):
    """`save_adapter(plain=True)`: [A; Vh_d], [B·diag(d), −U_d·S_d/s] at rank 2r with s kept, for runtimes without
    KaSA (vLLM): PEFT and lorakit load it as plain LoRA on the original W0 and compute our logits."""
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    x = ids()
    with torch.no_grad():
        ours = model(x).logits
    lorakit.save_adapter(model, tmp_path, plain=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "kasa_config" not in written and (written["r"], written["lora_alpha"]) == (8, 16)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("lora_diag" in k for k in tensors)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    back = tiny_llama()
    lorakit.load_adapter(back, tmp_path)
    assert type(back.model.layers[0].self_attn.q_proj.adapters["default"].variant) is Variant
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(x).logits, ours, atol=ATOL, rtol=0)


def test_lorakit_convert_writes_it_plain_from_the_command_line(tmp_path):
    from fsdp_worker import char_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "k")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "convert",
            "--adapter",
            str(tmp_path / "k"),
            "--model",
            str(tmp_path / "base"),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "plain PEFT LoRA adapter of r=8 (was r=4)" in out.stdout
    x = ids()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(use_kasa=False, use_dora=True), "DoRA's magnitude"),
        (dict(use_kasa=False, lora_bias=True), "lora_bias"),
    ],
    ids=["dora", "lora_bias"],
)
def test_what_no_lora_pair_expresses_is_not_saved_plain(kw, words, tmp_path):
    model = lorakit.inject(tiny_llama(), config(**kw))
    with pytest.raises(AdapterError, match=words) as e:
        lorakit.save_adapter(model, tmp_path / "p", plain=True)
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()


def test_resumed_training_equals_uninterrupted(tmp_path):
    """The dropped part is no state of the run: a resumed run computes it again from W0."""
    resumed_equals_uninterrupted(tmp_path, config(targets=["q_proj", "v_proj"]), data_init=False)


def test_llama_cpp_sees_plain_lora_of_rank_2r():
    model = lorakit.inject(tiny_llama(), config())
    randomize(model, std=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    A, B, s = adapter.variant.factors(adapter)
    assert A.shape == (8, 32) and B.shape == (32, 8)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + s * (x @ A.T) @ B.T, atol=ATOL, rtol=0)


def test_a_4bit_base_takes_it_from_its_dequantized_weight():
    """PEFT adds KaSA to nn.Linear only; here an NF4 base gets it too: the SVD is of the dequantized weight, so a
    fresh adapter computes the dequantized model truncated (4-bit matmul against dense: 1e-4)."""
    model, dense = tiny_llama(), tiny_llama()
    lorakit.quantize(model)
    lorakit.quantize(dense)
    lorakit.dequantize(dense)
    x = ids()
    want = truncated_logits(dense, x, r=4)
    with torch.no_grad():
        base = model(x).logits
    lorakit.inject(model, config())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=REBUILT, rtol=0)
        with lorakit.disabled(model):
            assert torch.equal(model(x).logits, base)


def test_the_report_counts_the_singular_values():
    model = lorakit.inject(tiny_llama(), config())
    report = lorakit.parameter_report(model)
    q = next(row for row in report["layers"] if row["module"].endswith("layers.0.self_attn.q_proj"))
    assert q["lora"] == 4 * 32 + 32 * 4 + 4 and q["variant"] == "kasa"
    assert sum(row["lora"] for row in report["layers"]) == report["trainable"]


def test_inspect_names_it_and_counts_what_the_file_stores(tmp_path):
    lorakit.save_adapter(lorakit.inject(tiny_llama(), config()), tmp_path)
    out = inspect_stdout(tmp_path)
    assert "KaSA: a learnable singular value per rank" in out and "beta=0.0001 gamma=0.001" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("model.layers.0.mlp.down_proj"))
    assert row[1:] == ["4", "32", "64", "2,048", str(4 * 64 + 32 * 4 + 4)]


@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(r=32), AdapterError, "KaSA needs r < 32"),
        (dict(targets=["embed_tokens"]), TargetError, "nn.Linear"),
    ],
    ids=["rank-too-high", "embedding"],
)
def test_what_cannot_be_built_is_refused_and_the_model_left_as_it_was(kw, error, words):
    model = tiny_llama()
    refused_untouched(model, error, words, lambda: lorakit.inject(model, config(**kw)))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(use_dora=True), "use_kasa does not work with use_dora"),
        (dict(init="pissa"), "use_kasa does not work with init='pissa'"),
        (dict(kasa_beta=-1), "kasa_beta must be a finite number >= 0"),
        (dict(use_bdlora={"nblocks": 2}), "does not work with"),
    ],
    ids=["dora", "pissa", "beta", "bdlora"],
)
def test_bad_settings_are_config_errors(kw, words):
    with pytest.raises(ConfigError, match=words):
        config(**kw)


def test_bad_files_and_runs_are_refused(tmp_path):
    model = lorakit.inject(tiny_llama(), config())
    lorakit.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(ConfigError, match="kasa_config must be a mapping with keys beta and gamma"):
        LoraConfig.from_peft_dict({**cfg, "kasa_config": {"beta": 1, "rho": 2}})
    with pytest.raises(AdapterError, match="KaSA"):  # its update depends on W0, which combine does not have
        lorakit.combine([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], "cat", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    from lorakit.train.config import load_config

    with pytest.raises(ConfigError, match="use_kasa works with method lora"):
        load_config(None, ["--lora.use_kasa", "true", "--train.method", "dylora"])
    with pytest.raises(ConfigError, match="use_kasa does not support train.fsdp"):
        load_config(None, ["--lora.use_kasa", "true", "--train.fsdp", "true"])
    from lorakit.variants.adalora import AdaLoraConfig, inject_adalora
    from lorakit.variants.dylora import check_lora_config

    with pytest.raises(ConfigError, match="AdaLoRA does not support use_kasa"):  # the Python API too
        inject_adalora(tiny_llama(), config(), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    with pytest.raises(ConfigError, match="DyLoRA cannot be combined with lora.use_kasa"):
        check_lora_config(config(), 1)
    assert peft_config(config()).kasa_config is not None


def test_served_beside_other_adapters_as_offline_generation(tmp_path, one_thread):
    """`lorakit serve`'s engine: rows of a KaSA adapter, a plain adapter and the base in one batch each give offline
    greedy generation's tokens."""

    model = tiny_llama()
    lorakit.inject(model, config(), "k")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), "p")
    randomize(model, std=0.3)
    for name in ("k", "p"):
        lorakit.save_adapter(model, tmp_path / name, name)
    served_as_offline(tiny_llama, tmp_path, ["k", "p", None])


@pytest.mark.real_model
def test_real_model_both_ways_with_peft(default_model_dir, tmp_path):
    """SmolLM2 with KaSA r=8 on the seven projections of its first, a middle and its last layer (21 modules: each
    costs an SVD of its weight on every side, and the other 27 layers repeat their shapes). A new adapter computes
    the model truncated in float64, and PEFT, which rebuilds W0 from its 568 kept float32 singular triplets per
    module, computes our logits both ways. Tolerances on logits ~40: seen 4.2e-5 against float64 and 8.7e-5
    against PEFT, allowed 10× that for other CPUs' SVD routines. (With all 210 modules the errors add up: PEFT was
    8.4e-3 from ours, and its own distance to float64 is 3× ours: benchmarks/bench_kasa.py --precision 8.)"""
    layers = [0, 14, 29]
    model, tok = lorakit.load_model(default_model_dir)
    x = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    exact = truncated_logits(lorakit.load_model(default_model_dir)[0].double(), x, r=8, layers=layers).float()
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=SEVEN, layers=layers, use_kasa=True))
    assert sum(isinstance(m, lorakit.LoraLayer) for m in model.modules()) == 21
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, exact, atol=5e-4, rtol=0)
    randomize(model, std=0.02)
    with torch.no_grad():
        ours = model(x).logits
        assert (ours - exact).abs().max() > 0.1
    lorakit.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(lorakit.load_model(default_model_dir)[0], tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=1e-3, rtol=0)
        theirs.save_pretrained(tmp_path / "b")
    back, _ = lorakit.load_model(default_model_dir)
    lorakit.load_adapter(back, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours, atol=2e-6, rtol=0)  # the same file, the same numbers
