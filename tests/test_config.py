"""LoraConfig validation and the PEFT json mapping."""

from __future__ import annotations

import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be a finite number > 0"),
        (dict(dropout=1.0), r"dropout must be a finite number in \[0, 1\)"),
        (dict(targets=[]), "targets must name at least one module"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init="dora"), "init must be one of"),
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
    with pytest.raises(ConfigError, match="use_qalora=True is a PEFT feature lorakit does not support"):
        LoraConfig.from_peft_dict({**d, "use_qalora": True})
    with pytest.raises(ConfigError, match="init_lora_weights='lora_ga': the adapter is relative to base weights that LoRA-GA changed"):
        LoraConfig.from_peft_dict({**d, "init_lora_weights": "lora_ga"})
    # the same keys at their defaults are fine
    LoraConfig.from_peft_dict(
        {**d, "lora_bias": False, "trainable_token_indices": None, "layer_replication": None}
    )


def test_scaling_for_module():
    cfg = LoraConfig(r=4, alpha=8, rank_pattern={"k_proj": 16}, use_rslora=True)
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(8 / 2)
    assert cfg.scaling_for("model.layers.0.self_attn.k_proj") == pytest.approx(8 / 4)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=INF), r"alpha must be a finite number > 0, got inf"),
        (dict(alpha=-INF), r"alpha must be a finite number > 0"),
        (dict(alpha=NAN), r"alpha must be a finite number > 0, got nan"),
        (dict(dropout=NAN), r"dropout must be a finite number in \[0, 1\)"),
        (dict(alpha_pattern={"q": INF}), r"alpha_pattern\['q'\] must be a finite number > 0, got inf"),
        (dict(alpha_pattern={"q": NAN}), r"alpha_pattern\['q'\] must be a finite number > 0"),
        (dict(alpha=True), r"alpha must be a finite number > 0, got True"),
        (dict(alpha="8"), r"alpha must be a finite number > 0, got '8'"),
    ],
)
def test_non_finite_and_non_numeric_numbers_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank_pattern=[4]), r"rank_pattern must be a mapping of module pattern -> rank, got list"),
        (dict(rank_pattern="x"), r"rank_pattern must be a mapping of module pattern -> rank, got str"),
        (dict(alpha_pattern="x"), r"alpha_pattern must be a mapping of module pattern -> alpha, got str"),
        (dict(alpha_pattern=[1.0]), r"alpha_pattern must be a mapping"),
        (dict(rank_pattern={"q": True}), r"rank_pattern\['q'\] must be a positive integer, got True"),
        (dict(rank_pattern={3: 2}), r"rank_pattern keys must be strings \(module patterns\), got 3"),
        (dict(use_rslora="false"), r"use_rslora must be true or false, got 'false'"),
        (dict(use_dora=1), r"use_dora must be true or false, got 1"),
        (dict(exclude=3), r"exclude must be a string, a list of strings or null, got 3"),
        (dict(targets=["q", 3]), r"targets must be a string or a list of strings, got \['q', 3\]"),
        (dict(layers="0"), r"layers must be a list of layer indices .*, got '0'"),
        (dict(layers=[True]), r"layers must be a list of layer indices .*, got \[True\]"),
        (dict(layers=[-1]), r"layers must be a list of layer indices"),
        (dict(layers_pattern=5), r"layers_pattern must be a string, a list of strings or null, got 5"),
        (dict(task_type=5), r"task_type must be a string or null, got 5"),
        (dict(base_model=["x"]), r"base_model must be a string or null"),
    ],
)
def test_field_types_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lora_alpha", INF, r"lora_alpha must be a finite number > 0, got inf"),
        ("lora_dropout", INF, r"lora_dropout must be a finite number in \[0, 1\)"),
        ("alpha_pattern", {"q_proj": INF}, r"alpha_pattern\['q_proj'\] must be a finite number > 0, got inf"),
        ("rank_pattern", [4], r"rank_pattern must be a mapping of module pattern -> rank, got list"),
        ("alpha_pattern", "x", r"alpha_pattern must be a mapping of module pattern -> alpha, got str"),
        ("use_rslora", "false", r"use_rslora must be true or false"),
        ("exclude_modules", 3, r"exclude_modules must be a string, a list of strings or null"),
        ("layers_to_transform", "0", r"layers_to_transform must be a list of layer indices"),
    ],
)
def test_peft_dict_errors_name_the_file_and_the_peft_key(key, value, match):
    d = {**LoraConfig().to_peft_dict(), key: value}
    with pytest.raises(ConfigError, match=r"^my/adapter_config\.json: " + match) as info:
        LoraConfig.from_peft_dict(d, source="my/adapter_config.json")
    assert "\n" not in str(info.value)
