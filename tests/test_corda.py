"""CorDA (`lorakit.variants.corda`, init "corda"): A and B from W0 oriented by the covariance of its inputs on
data, W0 keeping the residual. PEFT's `preprocess_corda` + `get_peft_model` is the oracle (the same B·A and the
same residual W0, in both modes, also for padded batches against PEFT's one sample per forward); saved, the
adapter is plain LoRA of rank 2r that PEFT and lorakit load on the original base with the trained logits; a raw
PEFT CorDA file is refused, PEFT's converted one loads; training, resuming, bad inputs, and the real default
model."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.corda import preprocess_corda

import lorakit
from lorakit import LoraConfig
from lorakit.data.jsonl import DataError
from lorakit.errors import AdapterError, ConfigError
from lorakit.train.config import RunConfig, load_config
from lorakit.train.schedule import init_batches

from runs import addition_run, resumed_equals_uninterrupted
from tiny import ids, peft_config, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = LoraConfig(r=4, alpha=8, targets=TARGETS, init="corda")
# The same damped inverse and SVD of the same f32 matrices on both sides, summed in another order. On the tiny
# model B·A has entries up to ~1e-2 and W0 ~0.1; they agree to 5e-6 (measured, ipm; 5e-7 kpm). 2e-5 leaves room
# for other BLAS builds and is far below a wrong mode or scaling (the whole of B·A).
ATOL = 2e-5


def _rows(n: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (seq - (i % 3) * 3,), generator=g) for i in range(n)]


def _padded(rows: list[torch.Tensor], per: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of `per` rows (pad id 0), as a training loop feeds them."""
    out = []
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        width = max(len(r) for r in chunk)
        ids_ = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids_[j, : len(r)], mask[j, : len(r)] = r, 1
        out.append({"input_ids": ids_, "attention_mask": mask})
    return out


def _peft_corda(model, cfg, rows, keep_covariance=False):
    """PEFT's CorDA on `model`, one unpadded sample per forward (as its preprocess_corda expects)."""
    pc = peft_config(cfg)
    pc.corda_config.prune_temporary_fields = not keep_covariance
    preprocess_corda(model, pc, run_model=lambda: [model(r[None]) for r in rows])
    return peft.get_peft_model(model, pc)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_is_peft_corda_also_for_padded_batches(mode):
    rows = _rows(9, 16, seed=int(mode == "kpm"))
    cfg = CFG.replace(corda_mode=mode)
    ours = tiny_llama()
    res = lorakit.inject_corda(ours, cfg, _padded(rows, 3), progress=False)
    assert (res.batches, res.samples, res.tokens) == (3, 9, sum(len(r) for r in rows))
    assert res.groups == 8 and len(res.covariances) == 14  # q/k/v and gate/up share their inputs
    theirs = _peft_corda(tiny_llama(), cfg, rows)
    for name, layer in _layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        mine, peft_ba = a.lora_B @ a.lora_A, p.lora_B["default"].weight @ p.lora_A["default"].weight
        torch.testing.assert_close(mine, peft_ba, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, p.base_layer.weight, atol=ATOL, rtol=0)
        assert mine.abs().max() > 1e-3  # a real part of W0 (whose entries are ~0.02 here), not zeros


def test_output_unchanged_and_delete_gives_w0_back():
    x = ids()
    model = tiny_llama()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x).logits
    lorakit.inject_corda(model, CFG, _padded(_rows(6, 16, seed=3), 2), progress=False)
    # W0 - s·B·A + s·B·A in f32: rounding of entries of order 1 (measured 1e-7 on logits)
    torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.base_layer.weight, w0["model.layers.0.mlp.down_proj.weight"])
    lorakit.delete_adapter(model, "default")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_as_plain_lora_that_peft_and_ours_load_on_the_original_base(rslora, tmp_path):
    x = ids()
    model = tiny_llama()
    lorakit.inject_corda(model, CFG.replace(use_rslora=rslora), _padded(_rows(6, 16, seed=4), 3), progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training does: A and B move
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    want = model(x).logits
    lorakit.save_adapter(model, tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and "corda_config" not in saved or not saved["corda_config"]
    assert saved["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "c").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=1e-5, rtol=0)  # f32 logits of order 1
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "c")
    torch.testing.assert_close(fresh(x).logits, want, atol=1e-5, rtol=0)


def test_a_raw_peft_corda_file_is_refused_and_its_converted_file_loads(tmp_path):
    rows = _rows(6, 16, seed=5)
    theirs = _peft_corda(tiny_llama(), CFG, rows)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the start as plain LoRA
    theirs.save_pretrained(tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = "corda"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = ids()
    want = theirs(x).logits
    theirs.save_pretrained(tmp_path / "raw")
    with pytest.raises(ConfigError) as info:
        lorakit.load_adapter(tiny_llama(), tmp_path / "raw")
    msg = str(info.value)
    assert "init_lora_weights='corda'" in msg and "path_initial_model_for_weight_conversion" in msg and "\n" not in msg
    theirs.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "plain")
    torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make, cfg, error, message",
    [
        (tiny_llama, CFG.replace(targets=["embed_tokens"]), AdapterError, "CorDA init supports linear layers only"),
        (tiny_llama, CFG.replace(r=40, targets=["q_proj"]), AdapterError, "CorDA init needs r <= 32"),
        ("nf4", CFG, AdapterError, "a 4-bit base"),
        (tiny_llama, "no batches", DataError, "CorDA needs at least one batch"),
        (tiny_llama, "zero inputs", AdapterError, "a sample whose inputs are all zero"),
    ],
)
def test_bad_corda_is_one_line_and_leaves_the_model_as_it_was(make, cfg, error, message):
    model = tiny_llama()
    if make == "nf4":
        lorakit.quantize(model, "nf4")
    batches = _padded(_rows(4, 12, seed=6), 2)
    if cfg == "no batches":
        cfg, batches = CFG, []
    elif cfg == "zero inputs":
        cfg = CFG.replace(targets=["q_proj"])
        with torch.no_grad():
            model.model.embed_tokens.weight.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        lorakit.inject_corda(model, cfg, batches, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value), info.value
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not lorakit.adapter_names(model)


def test_bad_corda_settings_and_plain_inject_name_the_way():
    with pytest.raises(ConfigError, match="corda_mode must be one of"):
        CFG.replace(corda_mode="both")
    with pytest.raises(ConfigError, match="corda_batches must be a positive integer"):
        CFG.replace(corda_batches=0)
    with pytest.raises(ConfigError, match="init='corda' does not work with use_dora"):
        CFG.replace(use_dora=True)
    with pytest.raises(ConfigError, match="lora.init corda works with method lora"):
        load_config(None, ["--lora.init", "corda", "--method", "adalora"])
    model = tiny_llama()
    with pytest.raises(AdapterError, match="lorakit.inject_corda"):
        lorakit.inject(model, CFG)
    assert not lorakit.adapter_names(model)


def test_lorakit_train_with_corda(tmp_path):
    summary, _ = addition_run(tmp_path, "--lora.init", "corda", "--lora.corda_batches", "4")
    corda = summary["corda"]
    assert corda["batches"] == 4 and corda["samples"] == 16 and corda["modules"] >= 1
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * RunConfig().lora.r  # plain LoRA, [A; A0]


def test_a_resumed_corda_run_ends_as_an_uninterrupted_one(tmp_path):
    """The checkpoint holds the rank-r A and B; the resumed run computes CorDA again from the same batches."""
    full, second = resumed_equals_uninterrupted(tmp_path, CFG.replace(corda_batches=3), data_init=True)
    for k, v in full.state_dict().items():  # and the same residual W0
        torch.testing.assert_close(second.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.real_model
def test_real_model_corda_matches_peft_and_loads_in_peft(default_model_dir, tmp_path):
    """SmolLM2 on the built-in task's first training rows (3 batches, padded), layers 0 and 1, against PEFT's
    CorDA fed one unpadded sample per forward: the same covariances, the same B·Bᵀ, B·A as close as f32 allows;
    trained (perturbed) and saved, PEFT's load gives our logits."""
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.run import load_examples

    model, tok = lorakit.load_model(str(default_model_dir))
    run = RunConfig(lora=LoraConfig(init="corda", corda_batches=3))
    train, _, _ = load_examples(run)
    rows, _ = encode_dataset(tok, train, max_len=run.data.max_len, chat=run.data.chat)
    batches = list(init_batches(rows, run, tok.pad_token_id))
    samples = [b["input_ids"][i][b["attention_mask"][i].bool()] for b in batches for i in range(len(b["input_ids"]))]
    cfg = LoraConfig(r=8, alpha=16, targets=TARGETS, layers=[0, 1], init="corda")
    x = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**x).logits
    res = lorakit.inject_corda(model, cfg, batches, progress=False)
    assert res.samples == len(samples) == 24 and len(res.covariances) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, base, atol=2e-3, rtol=0)  # logits ~40, f32 residual
    fresh, _ = lorakit.load_model(str(default_model_dir))
    theirs = _peft_corda(fresh, cfg, samples, keep_covariance=True)
    with torch.no_grad():  # comparisons only
        for name, layer in _layers(model).items():
            p = theirs.base_model.model.get_submodule(name)
            c = p.base_layer.covariance_matrix
            torch.testing.assert_close(res.covariances[name], c, atol=1e-5 * float(c.abs().max()), rtol=0)
            a, pa, pb = layer.adapters["default"], p.lora_A["default"].weight, p.lora_B["default"].weight
            # B·Bᵀ = U_r·(S_r/s)·U_rᵀ: the output directions and their weights, well conditioned (measured 1e-6 rel.)
            bb = pb @ pb.T
            torch.testing.assert_close(a.lora_B @ a.lora_B.T, bb, atol=1e-5 * float(bb.abs().max()), rtol=0)
            # A carries the damped C⁻¹, which turns f32 rounding into differences of ~1e-2 in B·A on this model: PEFT's
            # own B·A moves by up to 2.4% of its largest entry when its C is perturbed by 1e-7 (relative; bench_corda.py
            # --part sensitivity). Compared to 5% of its largest entry (measured worst here: 2.4%), which a wrong mode
            # or scaling exceeds many times.
            ba = pb @ pa
            torch.testing.assert_close(a.lora_B @ a.lora_A, ba, atol=0.05 * float(ba.abs().max()), rtol=0)
    del theirs, fresh
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ours = model(**x).logits
    assert (ours - base).abs().max() > 0.1  # the adapter matters
    lorakit.save_adapter(model, tmp_path / "corda")
    fresh, _ = lorakit.load_model(str(default_model_dir))
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "corda").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, atol=2e-3, rtol=0)  # as test_inits' OLoRA
