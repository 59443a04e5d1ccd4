"""LoRA+: parameter groups with lr_B = ratio · lr_A, checked against PEFT's create_loraplus_optimizer, and the
`--method loraplus` switch of the training loop."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train.config import LoraPlusSection, RunConfig, TrainSection, load_config
from lorakit.train.loop import train_loop
from lorakit.train.methods import param_groups

from tiny import peft_config, tiny_gpt2, tiny_llama, token_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _lr_by_param(groups) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_groups_carry_the_ratio():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj", "embed_tokens"]))
    groups = lorakit.loraplus_groups(model, lr=1e-3, ratio=16.0, lr_embedding=5e-6)
    assert {g["name"]: g["lr"] for g in groups} == {"lora_A": 1e-3, "lora_B": 16e-3, "embedding": 5e-6}
    lr = _lr_by_param(groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(lr)  # every trainable parameter once, nothing else
    for name, layer in lorakit.lora_layers(model):
        a = layer.adapters["default"]
        if name.endswith("embed_tokens"):
            assert lr[id(a.lora_A)] == lr[id(a.lora_B)] == 5e-6
        else:
            assert lr[id(a.lora_A)] == 1e-3 and lr[id(a.lora_B)] == pytest.approx(16e-3)


@pytest.mark.parametrize(
    "make, config",
    [
        pytest.param(tiny_llama, LoraConfig(r=4, targets="all-linear"), id="llama-all-linear"),
        pytest.param(
            tiny_llama, LoraConfig(r=4, targets=["q_proj", "down_proj", "embed_tokens"]), id="llama-embedding"
        ),
        pytest.param(
            tiny_llama, LoraConfig(r=4, targets=["q_proj", "up_proj"], use_dora=True), id="llama-dora"
        ),
        pytest.param(tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_fc"], bias="all"), id="gpt2-bias-all"),
    ],
)
def test_groups_match_peft_create_loraplus_optimizer(make, config):
    """Same tiny model and config in PEFT and in lorakit: every parameter gets the same learning rate."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ref = peft.get_peft_model(make(), peft_config(config))
    opt = create_loraplus_optimizer(
        ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0, loraplus_lr_embedding=3e-6
    )
    theirs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            theirs[next(n for n, q in ref.named_parameters() if q is p)] = g["lr"]

    model = make()
    lorakit.inject(model, config)
    ours_by_id = _lr_by_param(lorakit.loraplus_groups(model, lr=1e-3, ratio=8.0, lr_embedding=3e-6))
    ours = {_peft_name(n): ours_by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    assert {k: pytest.approx(v) for k, v in ours.items()} == theirs
    assert len({round(v, 9) for v in ours.values()}) >= 2  # the ratio really splits the parameters


def _peft_name(ours: str) -> str:
    """lorakit's parameter name -> PEFT's (base_model.model. prefix, adapter name inside the ModuleDict)."""
    n = ours
    for ourname, peftname in [
        (".adapters.default.lora_A", ".lora_A.default.weight"),
        (".adapters.default.lora_B", ".lora_B.default.weight"),
        (".adapters.default.magnitude", ".lora_magnitude_vector.default.weight"),
    ]:
        n = n.replace(ourname, peftname)
    if ".embed_tokens." in n:
        n = n.replace(".lora_A.default.weight", ".lora_embedding_A.default")
        n = n.replace(".lora_B.default.weight", ".lora_embedding_B.default")
    return "base_model.model." + n


def test_loraplus_optimizer_steps_b_with_ratio_times_the_step_of_plain_adam():
    """First AdamW step moves every entry by ~lr (Adam's normalised update): B by ratio·lr, A by lr."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="random"))
    opt = lorakit.loraplus_optimizer(model, lr=1e-3, ratio=16.0, weight_decay=0.0)
    layer = dict(lorakit.lora_layers(model))["model.layers.0.self_attn.q_proj"]
    a = layer.adapters["default"]
    before_a, before_b = a.lora_A.detach().clone(), a.lora_B.detach().clone()
    model(torch.randint(0, 128, (2, 8))).logits.pow(2).mean().backward()
    opt.step()
    # |Adam's first update| = lr · |g| / (|g| + eps); here |g| ~ 1e-5, eps = 1e-8: within 0.5% of lr
    step_a = (a.lora_A - before_a).abs().max().item()
    step_b = (a.lora_B - before_b).abs().max().item()
    assert step_a == pytest.approx(1e-3, rel=5e-3) and step_b == pytest.approx(16e-3, rel=5e-3)


def test_method_loraplus_trains_with_the_groups(tmp_path):
    cfg = load_config(
        None, ["--method", "loraplus", "--loraplus.ratio", "4", "--train.out_dir", str(tmp_path)]
    )
    assert cfg.methods == ("lora", True)
    t = dict(out_dir=str(tmp_path), steps=3, batch_size=4, lr=1e-2, warmup_steps=0, save_every=0)
    cfg.train = TrainSection(**t, method="loraplus")
    cfg.lora = LoraConfig(r=4, alpha=8, targets="all-linear")
    model = tiny_llama()
    lorakit.inject(model, cfg.lora)
    assert sorted(g["lr"] for g in param_groups(model, cfg)) == [1e-2, 4e-2]
    train_loop(model, token_rows(8), cfg, pad_id=0, out_dir=tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_bad_loraplus_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"loraplus\.ratio must be > 0"):
        load_config(None, ["--method", "loraplus", "--loraplus.ratio", "0"])
    with pytest.raises(ConfigError, match=r"loraplus\.ratio is set but train\.method is 'lora'"):
        load_config(None, ["--loraplus.ratio", "4"])
    with pytest.raises(ConfigError, match="ratio must be > 0"):
        lorakit.loraplus_optimizer(tiny_llama(), lr=1e-3, ratio=-1)
    RunConfig(loraplus=LoraPlusSection(ratio=2.0))  # dataclass itself: validated by load_config/from_dict
