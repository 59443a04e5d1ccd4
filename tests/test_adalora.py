"""AdaLoRA against PEFT's AdaLoraModel: the same budget and the same kept ranks at every step, files that each
tool loads from the other with the same logits, the training loop's hooks and resume, and clear errors.

Tolerances: the training cross-check runs the same float32 operations in the same order as PEFT (forward, the
orthogonality loss, AdamW), so losses, budgets and rank patterns must agree exactly. Loading a file in the other
tool changes the operation order slightly (truncated tensors, merged scaling), so logits of magnitude ~1 are
compared with atol=1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, TargetError
from lorakit.inject import lora_layers
from lorakit.io import check_adapter
from lorakit.train.config import AdaLoraSection, RunConfig, TrainSection, load_config
from lorakit.train.loop import TrainingError, train_loop
from lorakit.train.methods import make_method
from lorakit.variants.adalora import (
    AdaLoraAllocator,
    AdaLoraConfig,
    adalora_config,
    inject_adalora,
    orth_loss,
)

from tiny import ids, tiny_gpt2, tiny_llama, token_rows

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
T = 14
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=T)


def _copy_from_peft(ours, pm) -> None:
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for m, layer in lora_layers(ours):
            for n in ("lora_A", "lora_B", "lora_E"):
                getattr(layer.adapters["default"], n).copy_(theirs[f"{m}.{n}.default"])


@pytest.fixture(scope="module")
def trained_pair():
    """PEFT's AdaLoRA and ours from the same start, stepped on the same batches with AdamW; per-step records."""
    torch.manual_seed(0)
    pcfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", lora_alpha=8, target_modules=TARGETS, **SCHEDULE)
    pm = peft.get_peft_model(tiny_llama(), pcfg)
    ours = tiny_llama()
    inject_adalora(ours, LoraConfig(alpha=8, targets=TARGETS), AdaLoraConfig(**SCHEDULE))
    # the same operations in the same order as PEFT's model: without lorakit's block rewrites, whose RMSNorm
    # backward sums in another order (exact to float32 rounding; tests/test_blocks.py), which 20 steps of AdamW
    # at lr 2e-2 would carry into the last bits of the loss
    lorakit.set_lean_blocks(ours, False)
    _copy_from_peft(ours, pm)
    alloc = AdaLoraAllocator(ours)
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    steps = []
    for s in range(1, T + 1):
        x = ids(4, 12, seed=s)
        loss_p = pm(input_ids=x, labels=x).loss  # PEFT adds 0.5 * its orthogonality term
        loss_p.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(s)
        loss_o = ours(input_ids=x, labels=x).loss + 0.5 * orth_loss(ours)
        loss_o.backward()
        opt_o.step()
        budget = alloc.update_and_allocate(ours, s)
        opt_p.zero_grad()
        opt_o.zero_grad()
        pattern_p = pm.peft_config["default"].rank_pattern or {}
        steps.append(
            dict(
                loss=(loss_p.item(), loss_o.item()),
                budget=(pm.base_model.rankallocator.budget_schedule(s)[0], budget),
                pattern=(
                    {k.replace(".default", ""): v for k, v in pattern_p.items()},
                    alloc.config.rank_pattern,
                ),
            )
        )
    return pm.eval(), ours.eval(), alloc, steps


def test_budget_and_kept_ranks_match_peft_at_every_step(trained_pair):
    _, _, alloc, steps = trained_pair
    for s, rec in enumerate(steps, start=1):
        assert rec["loss"][0] == rec["loss"][1], f"step {s}: loss"
        assert rec["budget"][0] == rec["budget"][1], f"step {s}: budget"
        assert rec["pattern"][0] == (rec["pattern"][1] or {}), f"step {s}: rank pattern"
    budgets = [r["budget"][1] for r in steps]
    n = 2 * len(TARGETS)
    assert budgets[0] == 6 * n and budgets[-1] == 2 * n and budgets == sorted(budgets, reverse=True)
    ranks = alloc.ranks()
    assert sum(ranks.values()) <= 2 * n and len(set(ranks.values())) > 1, "allocation must be non-uniform"


def test_our_file_loads_in_peft_and_peft_file_loads_in_ours(trained_pair, tmp_path):
    pm, ours, _, _ = trained_pair
    x = ids(2, 12, seed=99)
    with torch.no_grad():
        ours_logits, peft_logits = ours(x).logits, pm(input_ids=x).logits
        base = tiny_llama()(x).logits
    assert (ours_logits - base).abs().max() > 1e-3, "the adapter must change the output"

    lorakit.save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["total_step"] == T
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key, keep in cfg["rank_pattern"].items():  # only the kept rows are saved, as PEFT does
        assert tensors[f"base_model.model.{key}"].shape == (sum(keep), 1)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours_logits, atol=ATOL, rtol=0)

    pm.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "peft")
    assert adalora_config(model).rank_pattern == cfg["rank_pattern"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, peft_logits, atol=ATOL, rtol=0)
        lorakit.merge(model)  # merging folds Λ into the base weights
        torch.testing.assert_close(model(x).logits, peft_logits, atol=ATOL, rtol=0)

    again = tiny_llama()  # our own files round-trip bit for bit
    lorakit.load_adapter(again, tmp_path / "ours")
    lorakit.save_adapter(again, tmp_path / "again")
    t2 = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) for k in t2)


def test_gpt2_conv1d_round_trip_with_peft(tmp_path):
    model = tiny_gpt2()
    inject_adalora(
        model, LoraConfig(alpha=4, targets=["c_attn"]), AdaLoraConfig(init_r=3, target_r=2, total_step=5)
    )
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_E.normal_(0, 1.0)
    x = ids(2, 10, seed=3)
    lorakit.save_adapter(model, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a").eval()
    with torch.no_grad():
        ref = model.eval()(x).logits
        assert (ref - tiny_gpt2()(x).logits).abs().max() > 1e-3
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, atol=ATOL, rtol=0)


def _cfg(tmp_path, **train) -> RunConfig:
    base = dict(
        out_dir=str(tmp_path), steps=6, batch_size=4, lr=1e-2, warmup_steps=1, save_every=0, method="adalora"
    )
    return RunConfig(
        lora=LoraConfig(r=16, alpha=8, targets=["q_proj", "v_proj"]),
        train=TrainSection(**{**base, **train}),
        adalora=AdaLoraSection(init_r=4, target_r=2, tinit=1, tfinal=2),
    )


def _run(tmp_path, seed=0, callbacks=None, **train):
    cfg = _cfg(tmp_path, **train)
    torch.manual_seed(seed)
    model = tiny_llama()
    method = make_method(cfg)
    method.prepare(model, None)
    train_loop(model, token_rows(), cfg, pad_id=0, out_dir=tmp_path, method=method, callbacks=callbacks)
    return model, method


def test_training_loop_runs_the_allocator_and_resumes_its_state(tmp_path):
    full, m_full = _run(tmp_path / "a")
    # 4 layers (q, v in 2 blocks): 16 triplets, tinit=1 step unpruned, cubic down to 2 x 4 at step 6 - 2 = 4
    assert m_full.budgets == [16, 10, 8, 8, 8, 8]
    pattern = m_full.allocator.config.rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) <= 8
    for _, layer in lora_layers(full):  # the final mask holds during the last tfinal steps
        a = layer.adapters["default"]
        keep = torch.tensor(pattern[f"{_}.lora_E"])
        assert torch.all(a.lora_E[~keep] == 0)

    def interrupt(rec):
        if rec.get("step") == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="interrupted at step 3"):
        _run(tmp_path / "b", callbacks=[interrupt])
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "method.safetensors").is_file()
    second, m_second = _run(tmp_path / "b", seed=123, resume="auto")
    assert m_second.allocator.config.rank_pattern == pattern
    a, b = lorakit.adapter_state_dict(full), lorakit.adapter_state_dict(second)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)  # same ops in the same order


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ["--adalora.init_r", "6"], "adalora.init_r is set but train.method is 'lora'", id="wrong-method"
        ),
        pytest.param(
            ["--method", "adalora", "--adalora.target_r", "16"],
            "target_r .16. must not exceed init_r",
            id="target>init",
        ),
        pytest.param(
            ["--method", "adalora", "--adalora.tinit", "30", "--adalora.tfinal", "10"],
            r"tinit \(30\) must be below total_step - tfinal \(40 - 10\)",
            id="no-budget-phase",
        ),
        pytest.param(
            ["--method", "adalora", "--lora.use_dora", "true"], "AdaLoRA does not support use_dora", id="dora"
        ),
        pytest.param(
            ["--method", "adalora", "--adalora.beta1", "1.5"], r"beta1 must be in \(0, 1\)", id="beta"
        ),
    ],
)
def test_bad_run_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_python_inputs(tmp_path):
    with pytest.raises(ConfigError, match="total_step is required"):
        AdaLoraConfig(init_r=4, target_r=2)
    with pytest.raises(ConfigError, match=r"target_r \(8\) must not exceed init_r \(4\)"):
        AdaLoraConfig(init_r=4, target_r=8, total_step=10)
    model = tiny_llama()
    with pytest.raises(TargetError, match="embed_tokens.*linear layers only"):
        inject_adalora(model, LoraConfig(targets=["embed_tokens"]), AdaLoraConfig(total_step=10))
    assert not lorakit.adapter_names(model)
    with pytest.raises(AdapterError, match="no AdaLoRA adapter"):
        AdaLoraAllocator(model)

    inject_adalora(model, LoraConfig(targets=["q_proj"]), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    lorakit.save_adapter(model, tmp_path / "ada")
    with pytest.raises(AdapterFileError, match="an AdaLoRA adapter .peft_type ADALORA., not plain LoRA"):
        lorakit.read_adapter(tmp_path / "ada")  # the plain-LoRA reader (combine, inspect) refuses it clearly
    cfg = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    cfg["init_r"] = 5  # the tensors no longer fit: refused before the model changes
    (tmp_path / "ada" / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_llama()
    with pytest.raises(AdapterError, match=r"lora_A has shape \(4, 32\) but .* needs \(5, 32\)"):
        lorakit.load_adapter(fresh, tmp_path / "ada")
    with pytest.raises(AdapterError, match="needs"):  # the adapter bank's pre-check says the same
        check_adapter(fresh, tmp_path / "ada")
    assert not lorakit.adapter_names(fresh)
