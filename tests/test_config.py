"""LoraConfig validation and the PEFT json mapping."""

from __future__ import annotations

import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(targets=[]), "targets must name at least one module"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init="olora"), "init must be one of"),
        (dict(targets=".*q", layers=[0]), "layers cannot be combined with a regex"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
        (dict(targets="([bad"), "invalid regex"),
    ],
)
def test_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError, match="lora_alpha"):
        LoraConfig(lora_alpha=8)


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(),
        LoraConfig(
            r=16,
            alpha=32,
            dropout=0.05,
            targets=["q_proj", "v_proj"],
            use_rslora=True,
            use_dora=True,
            bias="lora_only",
        ),
        LoraConfig(
            targets=r".*\.q_proj",
            exclude=["x"],
            rank_pattern={"q": 2},
            alpha_pattern={"v": 3.0},
            init="gaussian",
        ),
        LoraConfig(targets=["q"], layers=[0, 2], layers_pattern="layers", init="pissa"),
    ],
)
def test_peft_dict_roundtrip(cfg):
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg


def test_peft_names_and_init_mapping():
    d = LoraConfig(r=4, alpha=16, init="random").to_peft_dict()
    assert d["lora_alpha"] == 16 and d["target_modules"] == "all-linear" and d["init_lora_weights"] is False
    assert LoraConfig.from_peft_dict({**d, "init_lora_weights": True}).init == "default"


def test_unsupported_peft_features_are_errors_not_silence():
    d = LoraConfig().to_peft_dict()
    with pytest.raises(ConfigError, match="lora_bias=True is a PEFT feature lorakit does not support"):
        LoraConfig.from_peft_dict({**d, "lora_bias": True})
    with pytest.raises(ConfigError, match="init_lora_weights='olora' is not supported"):
        LoraConfig.from_peft_dict({**d, "init_lora_weights": "olora"})
    # the same keys at their defaults are fine
    LoraConfig.from_peft_dict(
        {**d, "lora_bias": False, "trainable_token_indices": None, "layer_replication": None}
    )


def test_scaling_for_module():
    cfg = LoraConfig(r=4, alpha=8, rank_pattern={"k_proj": 16}, use_rslora=True)
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(8 / 2)
    assert cfg.scaling_for("model.layers.0.self_attn.k_proj") == pytest.approx(8 / 4)
