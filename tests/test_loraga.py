"""LoRA-GA (`lorakit.variants.loraga`, init "lora_ga"): A and B from the SVD of W0's gradient on data, W0 keeping
the residual. PEFT's `preprocess_loraga` + `get_peft_model` is the oracle (the same A, B and residual W0 for each
direction and scale); our randomised SVD is torch's, drawing from a generator of its own; saved, the adapter is
plain LoRA of rank 2r that PEFT and lorakit load on the original base; a raw PEFT LoRA-GA file is refused, PEFT's
converted one loads; training, resuming, bad inputs, and the real default model."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.loraga import preprocess_loraga

import lorakit
from lorakit import LoraConfig
from lorakit.data.jsonl import DataError
from lorakit.data.tokenize import IGNORE
from lorakit.errors import AdapterError, ConfigError
from lorakit.train.config import RunConfig, load_config
from lorakit.train.schedule import init_batches
from lorakit.variants.loraga import svd_lowrank

from runs import addition_run, resumed_equals_uninterrupted
from tiny import ids, peft_config, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = LoraConfig(r=4, alpha=8, targets=TARGETS, init="lora_ga")


def _batches(n: int, per: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (pad id 0) whose first 3 tokens and padding carry no label, as a training loop feeds."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = [seq - (j % 3) * 2 for j in range(per)]
        x = torch.zeros(per, seq, dtype=torch.long)
        mask = torch.zeros(per, seq, dtype=torch.long)
        for j, n_ in enumerate(lengths):
            x[j, :n_], mask[j, :n_] = torch.randint(1, 128, (n_,), generator=g), 1
        labels = x.masked_fill(mask == 0, IGNORE)
        labels[:, :3] = IGNORE
        out.append({"input_ids": x, "attention_mask": mask, "labels": labels})
    return out


def _peft_loraga(model, cfg, batches, seed, monkeypatch, preprocessed=None):
    """PEFT's LoRA-GA on `model`, its randomised SVDs drawing from a generator seeded with `seed` in the order
    PEFT calls them (PEFT draws from torch's global generator, which its own layer constructors also advance:
    `test_svd_lowrank_is_torchs` shows that ours is torch's with its own generator). `preprocessed`: the PEFT
    config `preprocess_loraga` already ran with on `model`."""
    pc = preprocessed
    if pc is None:
        pc = peft_config(cfg)
        preprocess_loraga(model, pc, lambda: [model(**b).loss.backward() for b in batches])
    g = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(torch, "svd_lowrank", lambda a, q, niter: svd_lowrank(a, q, niter, g))
    try:
        return peft.get_peft_model(model, pc)
    finally:
        monkeypatch.undo()


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_svd_lowrank_is_torchs_with_its_own_generator(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    want = torch.svd_lowrank(a, q=12, niter=4)
    got = svd_lowrank(a, 12, 4, torch.Generator().manual_seed(7))
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)  # the same draws and the same operations: bit for bit


@pytest.mark.parametrize(
    "direction, scale", [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"), ("ArB2r", "unit")]
)
@torch.no_grad()
def test_loraga_is_peft_loraga(direction, scale, monkeypatch):
    batches = _batches(3, 3, 16, seed=1)
    cfg = CFG.replace(lora_ga_direction=direction, lora_ga_scale=scale, lora_ga_stable_gamma=9)
    ours = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    res = lorakit.inject_loraga(ours, cfg, batches, seed=5, progress=False)
    labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    assert (res.batches, res.samples, res.tokens, res.modules) == (3, 9, labelled, 14)
    theirs = _peft_loraga(tiny_llama(), cfg, batches, 5, monkeypatch)
    for name, layer in _layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        pa, pb = p.lora_A["default"].weight, p.lora_B["default"].weight
        # The same gradient (our chunked loss against the model's own, summed in another order: ~1e-5 apart)
        # through the same SVD draws. A singular vector's sign is LAPACK's choice, which so small a change can
        # flip (any sign is an equally valid start), so A's rows and B's columns are compared up to sign: to 1e-3
        # of the largest entry (measured worst 1.1e-4, A of A2rBr); a wrong direction or scale differs by O(1).
        sign_a = torch.sign((a.lora_A * pa).sum(1, keepdim=True))
        sign_b = torch.sign((a.lora_B * pb).sum(0, keepdim=True))
        for mine, peft_ in ((a.lora_A * sign_a, pa), (a.lora_B * sign_b, pb)):
            torch.testing.assert_close(mine, peft_, atol=1e-3 * float(peft_.abs().max()), rtol=0)
        moved = w0[name] - layer.base_layer.weight  # W0 gave up s·B·A, as PEFT's did (f32 rounding of W0's ~0.1
        # entries: measured 2e-9 on a change of ~2e-4)
        torch.testing.assert_close(moved, a.scaling * a.lora_B @ a.lora_A, atol=1e-3 * float(moved.abs().max()), rtol=0)
        assert moved.abs().max() > 0


def test_the_start_is_the_gradients_top_directions():
    """Whatever PEFT does: A's rows are r orthonormal right singular vectors of the gradient among its top 2r, the
    output is unchanged, and deleting the adapter gives W0 back; the gradient pass leaves the model's
    requires_grad, mode and .grad as they were."""
    x = ids()
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # a setting the pass must give back
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    wants = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    mode = model.training
    before = model(x).logits
    cfg = CFG.replace(lora_ga_direction="random", lora_ga_batches=2)
    alone = lorakit.loraga_gradients(model, cfg, _batches(3, 2, 12, seed=2), progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == wants  # the pass gives them back
    assert all(p.grad is None for p in model.parameters()) and model.training is mode
    res = lorakit.inject_loraga(model, cfg, _batches(3, 2, 12, seed=2), progress=False)
    assert all(torch.equal(res.gradients[k], g) for k, g in alone.gradients.items())
    assert res.batches == 2  # lora_ga_batches caps what it reads
    torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)  # W0 - s·B·A + s·B·A in f32
    for name, layer in _layers(model).items():
        a = layer.adapters["default"].lora_A.detach()
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)
        _, _, vh = torch.linalg.svd(res.gradients[name])
        top = vh[:8]  # the span of the top 2r right singular vectors holds every row of A
        torch.testing.assert_close(a @ top.T @ top, a, atol=1e-3, rtol=0)
    lorakit.delete_adapter(model, "default")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)


def test_the_same_seed_gives_the_same_start_and_another_seed_another():
    def start(seed):
        model = tiny_llama()
        lorakit.inject_loraga(model, CFG.replace(targets=["q_proj"]), _batches(2, 2, 12, seed=3), seed=seed, progress=False)
        return lorakit.adapter_state_dict(model)

    a, b, c = start(0), start(0), start(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a if "lora_A" in k)


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_as_plain_lora_that_peft_and_ours_load_on_the_original_base(rslora, tmp_path):
    x = ids()
    model = tiny_llama()
    lorakit.inject_loraga(model, CFG.replace(use_rslora=rslora), _batches(2, 3, 14, seed=4), progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training does: A and B move
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    want = model(x).logits
    lorakit.save_adapter(model, tmp_path / "ga")
    saved = json.loads((tmp_path / "ga" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and not saved.get("lora_ga_config")
    assert saved["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ga").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=1e-5, rtol=0)  # f32 logits of order 1
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "ga")
    torch.testing.assert_close(fresh(x).logits, want, atol=1e-5, rtol=0)


def test_a_raw_peft_loraga_file_is_refused_and_its_converted_file_loads(tmp_path):
    model = tiny_llama()
    batches = _batches(2, 2, 12, seed=5)
    pc = peft_config(CFG)
    preprocess_loraga(model, pc, lambda: [model(**b).loss.backward() for b in batches])
    theirs = peft.get_peft_model(model, pc)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the start as plain LoRA
    theirs.save_pretrained(tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = "lora_ga"
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
    assert "init_lora_weights='lora_ga'" in msg and "path_initial_model_for_weight_conversion" in msg
    assert "\n" not in msg
    # why: PEFT's own load of it puts the trained A, B on the unchanged base, without a word, and computes other
    # logits than the trained model's (here: by 0.08 on logits up to 0.47)
    silent = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "raw").eval()
    gap = (silent(x).logits - want).abs().max()
    assert gap > 1e-3, gap
    theirs.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["lora_ga_config"]  # ignored
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "plain")
    torch.testing.assert_close(fresh(x).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make, cfg, error, message",
    [
        (tiny_llama, CFG.replace(targets=["embed_tokens"]), AdapterError, "LoRA-GA init supports linear layers only"),
        (tiny_llama, CFG.replace(r=20, targets=["q_proj"]), AdapterError, "LoRA-GA init needs 2r <= 32"),
        ("nf4", CFG, AdapterError, "a 4-bit base"),
        (tiny_llama, "no batches", DataError, "LoRA-GA needs at least one batch"),
        (tiny_llama, "no labels", DataError, "LoRA-GA needs batches with labels"),
        (tiny_llama, "nothing labelled", DataError, "batch 2 has no labelled token"),
        (tiny_llama, "nan", AdapterError, "the loss of batch 1 is nan"),
    ],
)
def test_bad_loraga_is_one_line_and_leaves_the_model_as_it_was(make, cfg, error, message):
    model = tiny_llama()
    if make == "nf4":
        lorakit.quantize(model, "nf4")
    batches = _batches(2, 2, 12, seed=6)
    if cfg == "no batches":
        cfg, batches = CFG, []
    elif cfg == "no labels":
        cfg, batches = CFG, [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    elif cfg == "nothing labelled":
        cfg = CFG
        batches[1]["labels"][:] = IGNORE
    elif cfg == "nan":
        cfg = CFG
        with torch.no_grad():
            model.model.embed_tokens.weight[5:].fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wants = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error) as info:
        lorakit.inject_loraga(model, cfg, batches, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value), info.value
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k], ) or (after[k].isnan() == before[k].isnan()).all() for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == wants
    assert all(p.grad is None for p in model.parameters())
    assert not lorakit.adapter_names(model)


def test_bad_loraga_settings_and_plain_inject_name_the_way():
    for change, message in (
        (dict(lora_ga_direction="up"), "lora_ga_direction must be one of"),
        (dict(lora_ga_scale="big"), "lora_ga_scale must be one of"),
        (dict(lora_ga_stable_gamma=0), "lora_ga_stable_gamma must be a positive number"),
        (dict(lora_ga_batches=0), "lora_ga_batches must be a positive integer"),
        (dict(use_dora=True), "init='lora_ga' does not work with use_dora"),
    ):
        with pytest.raises(ConfigError, match=message):
            CFG.replace(**change)
    with pytest.raises(ConfigError, match="lora.init lora_ga works with method lora"):
        load_config(None, ["--lora.init", "lora_ga", "--method", "adalora"])
    model = tiny_llama()
    with pytest.raises(AdapterError, match="lorakit.inject_loraga"):
        lorakit.inject(model, CFG)
    assert not lorakit.adapter_names(model)


def test_lorakit_train_with_loraga(tmp_path):
    summary, _ = addition_run(tmp_path, "--lora.init", "lora_ga", "--lora.lora_ga_batches", "3", "--lora.r", "8")
    ga = summary["lora_ga"]
    assert ga["batches"] == 3 and ga["samples"] == 12 and ga["modules"] >= 1 and ga["loss"] > 0
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 16  # plain LoRA, [A; A0]


def test_a_resumed_loraga_run_ends_as_an_uninterrupted_one(tmp_path):
    """The checkpoint holds the rank-r A and B; the resumed run computes LoRA-GA again from the same batches and
    seed."""
    full, second = resumed_equals_uninterrupted(tmp_path, CFG.replace(lora_ga_batches=3), data_init=True, seed=3)
    for k, v in full.state_dict().items():  # and the same residual W0
        torch.testing.assert_close(second.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.real_model
def test_real_model_loraga_matches_peft_and_loads_in_peft(default_model_dir, tmp_path, monkeypatch):
    """SmolLM2 on the built-in task's first 2 training batches, layers 0 and 1: PEFT's gradients, and PEFT's A and B
    (its SVD drawing from the same generator) up to the sign of each singular vector; trained (perturbed) and
    saved, PEFT's load gives our logits."""
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.run import load_examples

    model, tok = lorakit.load_model(str(default_model_dir))
    run = RunConfig(lora=LoraConfig(init="lora_ga", lora_ga_batches=2))
    train, _, _ = load_examples(run)
    rows, _ = encode_dataset(tok, train, max_len=run.data.max_len, chat=run.data.chat)
    batches = list(init_batches(rows, run, tok.pad_token_id))
    cfg = LoraConfig(r=8, alpha=16, targets=TARGETS, layers=[0, 1], init="lora_ga")
    x = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**x).logits
    res = lorakit.inject_loraga(model, cfg, batches, seed=0, progress=False)
    assert res.batches == 2 and res.samples == 16 and res.modules == 14 and 0 < res.loss < 5
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, base, atol=2e-3, rtol=0)  # logits ~40, f32 residual
    fresh, _ = lorakit.load_model(str(default_model_dir))
    pc = peft_config(cfg)
    preprocess_loraga(fresh, pc, lambda: [fresh(**b).loss.backward() for b in batches])
    for name, g in res.gradients.items():
        # our chunked loss against the model's own full-logits loss: the same sums in another order, through 30
        # layers back to layers 0-1. Measured 1.4e-4 of the largest entry (with the model's own loss lorakit's
        # gradient is PEFT's bit for bit); 1e-3 is far below a wrong loss or mean (O(1)).
        theirs = fresh.get_submodule(name)._peft_loraga_grad
        torch.testing.assert_close(g, theirs, atol=1e-3 * float(theirs.abs().max()), rtol=0)
    theirs = _peft_loraga(fresh, cfg, [], 0, monkeypatch, preprocessed=pc)
    with torch.no_grad():
        for name, layer in _layers(model).items():
            p = theirs.base_model.model.get_submodule(name)
            a, pa, pb = layer.adapters["default"], p.lora_A["default"].weight, p.lora_B["default"].weight
            # A singular vector's sign is LAPACK's choice, and a change of 1e-4 in the gradient can flip it: any
            # sign is an equally valid LoRA-GA start. Up to sign, A's unit rows agree to 2e-3 (measured 1.5e-4)
            # and B to 1% of its largest entry (measured 1.3e-3); the wrong direction differs by 0.4 to 1.0.
            sign_a = torch.sign((a.lora_A * pa).sum(1, keepdim=True))
            sign_b = torch.sign((a.lora_B * pb).sum(0, keepdim=True))
            torch.testing.assert_close(a.lora_A * sign_a, pa, atol=2e-3, rtol=0)
            torch.testing.assert_close(a.lora_B * sign_b, pb, atol=0.01 * float(pb.abs().max()), rtol=0)
    del theirs, fresh
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ours = model(**x).logits
    assert (ours - base).abs().max() > 0.1  # the adapter matters
    lorakit.save_adapter(model, tmp_path / "ga")
    fresh, _ = lorakit.load_model(str(default_model_dir))
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "ga").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, atol=2e-3, rtol=0)  # as test_corda's
