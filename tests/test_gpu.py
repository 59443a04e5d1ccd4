"""The numerics again on CUDA: every test runs on the CPU, and again on `cuda` where there is a GPU.

The `cuda` cases carry the `gpu` marker. On a machine without CUDA, conftest.py deselects them (pytest's
summary counts them as deselected, and the header says why); on one with a GPU, `pytest -m gpu` runs them
alone (benchmarks/gpu_check.sh does). Tolerances: float32 on both devices, matmuls in full fp32 (torch leaves
TF32 off for matmuls by default), so two orders of summation differ by ~1e-6 relative; atol 1e-5 on logits of
order 1, as in test_peft_interop.py.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig, fused
from lorakit.device import resolve_device, upcast_trainable
from lorakit.dropout import dropout_keep, dropout_scale
from lorakit.fused import _LoraLinear
from lorakit.head import causal_lm_loss
from lorakit.mixed import row_adapters
from lorakit.quant import nf4

from tiny import each_row_alone, ids, randomize, tiny_llama, tiny_qwen2

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ATOL = 1e-5


def _on(model, device):
    return model.to(resolve_device(device))


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_merged_equals_unmerged(device):
    model = _on(tiny_llama(), device)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model, std=0.2)
    x = ids().to(model.device)
    want = model(x).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_peft_computes_what_we_compute(device, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    model = _on(tiny_llama(), device)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", use_rslora=True))
    randomize(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "a")
    x = ids().to(model.device)
    ours = model(x).logits
    theirs = peft.PeftModel.from_pretrained(_on(tiny_llama(), device), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(x).logits, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_equals_plain_autograd(device, p):
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=g) for s in [(7, 8), (6, 8), (6,)])
    a, bb = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    x, w, b, a, bb = (t.to(dev).requires_grad_(t is not w and t is not b) for t in (x, w, b, a, bb))
    seed = 99
    keep = dropout_keep(seed, x.shape, p, device=dev) if p else torch.ones_like(x, dtype=torch.bool)
    # the masks are a pure function of (seed, position): the CPU's and the GPU's are the same
    assert torch.equal(keep.cpu(), dropout_keep(seed, x.shape, p) if p else keep.cpu())
    want = x @ w.T + b + 0.5 * ((x * keep * dropout_scale(p)) @ a.T) @ bb.T
    got = _LoraLinear.apply(x, w, b, a, bb, 0.5, p, seed)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    gw = torch.autograd.grad(want.square().sum(), (x, a, bb))
    gg = torch.autograd.grad(got.square().sum(), (x, a, bb))
    for u, v in zip(gg, gw, strict=True):  # gradients of order 10: fp32 sums in another order, ~1e-6 relative
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_head_loss_and_fused_model_equal_the_plain_model(device):
    model = _on(tiny_llama(), device)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    model.train()
    x = ids().to(model.device)
    results = []
    for use in (True, False):
        old = fused.set_fused(use)
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, {"input_ids": x, "labels": x}, fused=use)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        fused.set_fused(old)
    (lf, gf), (lp, gp) = results
    torch.testing.assert_close(lf, lp, atol=2e-6, rtol=1e-5)
    for u, v in zip(gf, gp, strict=True):
        torch.testing.assert_close(u, v, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_equals_bitsandbytes(device):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the test extra")
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(192, 576, generator=g) * 0.02).to(dev)  # SmolLM2's k_proj shape
    packed, absmax = nf4.quantize_4bit(w)
    b_packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    assert torch.equal(packed, b_packed.view(-1)) and torch.equal(absmax, st.absmax)
    assert torch.equal(
        nf4.dequantize_4bit(packed, absmax, w.shape, w.dtype), bnbf.dequantize_4bit(b_packed, st)
    )


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_lora_bias_merges_mixes_and_matches_peft(device, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    model = _on(tiny_qwen2(), device)
    for name, r in (("a", 4), ("b", 2)):  # q and v have a bias in Qwen2, so b can merge
        lorakit.inject(model, LoraConfig(r=r, alpha=8, targets=["q_proj", "v_proj"], lora_bias=True), name=name)
    randomize(model, std=0.2)
    x = ids(batch=3).to(model.device)
    lorakit.set_active(model, "a")
    want = model(x).logits
    lorakit.save_adapter(model, tmp_path / "a", name="a")
    theirs = peft.PeftModel.from_pretrained(_on(tiny_qwen2(), device), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=ATOL, rtol=0)
    lorakit.merge(model)
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    lorakit.unmerge(model)
    lorakit.set_active(model, "b")
    b_rows = model(x).logits
    with row_adapters(model, ["a", "b", "a"]):
        got = model(x).logits
    torch.testing.assert_close(got, torch.stack([want[0], b_rows[1], want[2]]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_eva_on_the_device_agrees_with_the_cpu(device):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(20):
        x = torch.randint(0, 128, (4, 32), generator=g)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    config = LoraConfig(r=4, alpha=8, targets="all-linear", init="eva")
    cpu = lorakit.eva_components(tiny_llama(), config, batches, progress=False)
    model = _on(tiny_llama(), device)
    x = batches[0]["input_ids"].to(model.device)
    want = model(x).logits
    found = lorakit.inject_eva(model, config, batches, progress=False)  # batches move to the model's device
    assert sum(found.ranks.values()) == sum(cpu.ranks.values()) == 4 * 14
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)  # B = 0
    for m, a in found.components.items():
        assert a.device == model.device
        if m in cpu.components:  # the leading direction of each input; rounding may reorder close ones
            assert abs(float(a[0].cpu() @ cpu.components[m][0])) > 0.99, m


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_a_mixed_batch_equals_each_row_alone(device):
    model = _on(tiny_llama(), device)
    for name, r in (("a", 4), ("b", 2), ("c", 8)):
        lorakit.inject(model, LoraConfig(r=r, alpha=8, targets="all-linear"), name=name)
    randomize(model, std=0.2)
    names = ["a", "b", None, "c", "a"]
    x = ids(batch=len(names), seq=9).to(model.device)
    rows = each_row_alone(model, x, names)
    with row_adapters(model, names):
        got = model(x).logits
    torch.testing.assert_close(got, rows, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_16_bit_training_step_keeps_fp32_adapters_and_learns(device):
    from lorakit.device import autocast

    dev = resolve_device(device)
    model = tiny_llama().to(dev, torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert upcast_trainable(model) > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids().to(dev)
    losses = []
    for _ in range(5):
        with autocast(dev, torch.bfloat16):
            loss = causal_lm_loss(model, {"input_ids": x, "labels": x})
        assert loss.dtype == torch.float32  # the loss is computed in fp32
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert {p.dtype for p in params} == {torch.float32} and model.lm_head.weight.dtype == torch.bfloat16
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_4_bit_base_loads_onto_the_device_as_on_the_cpu(device, tmp_path):
    from fsdp_worker import char_tokenizer

    tiny_llama(hidden=64).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    dev = resolve_device(device)
    model, _, _ = lorakit.load_quantized(tmp_path, device=dev)  # quantized on the device, layer by layer
    ref, _, _ = lorakit.load_quantized(tmp_path)  # on the CPU
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].device.type == dev.type and torch.equal(got[k].cpu(), want[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "method",
    [
        ["--method", "lora", "--train.grad_checkpointing", "true"],
        ["--lora.use_dora", "true"],
        ["--lora.use_kasa", "true", "--lora.r", "4"],
        ["--method", "dylora"],
        [
            "--method",
            "adalora",
            "--adalora.init_r",
            "6",
            "--adalora.target_r",
            "2",
            "--adalora.tinit",
            "1",
            "--adalora.tfinal",
            "1",
            "--adalora.deltaT",
            "1",
        ],
        ["--method", "loraplus"],
        ["--method", "ladder"],
    ],
    ids=["lora-checkpointing", "dora", "kasa", "dylora", "adalora", "loraplus", "ladder"],
)
def test_every_method_trains_and_evaluates_on_the_device(device, method, tmp_path, one_thread):
    from runs import addition_run

    summary, model = addition_run(tmp_path, "--train.steps", "4", *method, device=str(resolve_device(device)))
    assert summary["last"]["loss"] == summary["last"]["loss"]  # finite: the loop stops on NaN anyway
    assert {p.device.type for p in model.parameters()} == {resolve_device(device).type}
    assert "accuracy" in summary["after"] and (tmp_path / "run" / "adapter").is_dir()


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_alora_on_the_device_equals_the_cpu_and_generates_as_peft(device, tmp_path):
    """aLoRA's masks are built on the device of the input_ids: the logits equal the CPU's, and greedy generation
    gives PEFT's tokens on the same device."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    inv = [5, 6, 7]
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", alora_invocation_tokens=inv))
    randomize(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "a")
    x = ids(batch=2, seq=12)
    x[x < 8] += 8
    x[0, 4:7] = torch.tensor(inv)  # row 1: no invocation, the base model
    want = model(x).logits
    model = _on(model, device)
    x = x.to(model.device)
    torch.testing.assert_close(model(x).logits.cpu(), want, atol=ATOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(_on(tiny_llama(), device), tmp_path / "a").eval()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), theirs.generate(input_ids=x, **kw))


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_a_tied_adapter_moved_to_the_device_stays_tied(device, tmp_path):
    """ensure_weight_tying: the head's adapter is a view of the embedding's, so moving the model keeps them one
    (PEFT's separate parameters on shared storage would part): the logits equal the CPU's and PEFT's on the
    device, and a merge on the device keeps the model tied."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    model = tiny_llama(tied=True)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "embed_tokens"], ensure_weight_tying=True))
    randomize(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "a")
    x = ids()
    want = model(x).logits
    model = _on(model, device)
    x = x.to(model.device)
    torch.testing.assert_close(model(x).logits.cpu(), want, atol=ATOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(_on(tiny_llama(tied=True), device), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(x).logits.cpu(), want, atol=ATOL, rtol=0)
    plain = lorakit.unload(model, merge=True)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain(x).logits.cpu(), want, atol=1e-4, rtol=0)  # merged: logits up to ~10
