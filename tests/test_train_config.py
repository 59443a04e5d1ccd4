"""Run configs: YAML plus --section.key overrides, unknown keys with a suggestion, round trip through config.yaml."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.train.config import help_text, load_config, save_config


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "--lora.r",
            "32",
            "--train.lr=2e-4",
            "--lora.targets",
            "[q_proj, v_proj]",
            "--data.train_on_all",
            "true",
            "--model.path",
            "null",
        ],
    )
    assert cfg.lora.r == 32 and cfg.train.lr == 2e-4 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.train_on_all is True and cfg.model.path is None
    assert cfg.lora.alpha == 32  # untouched fields keep the run defaults


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("lora:\n  r: 4\ntrain:\n  steps: 7\n  lr: 0.01\n")
    cfg = load_config(f, ["--train.steps", "9"])
    assert (cfg.lora.r, cfg.train.steps, cfg.train.lr) == (4, 9, 0.01)


def test_saved_config_is_reusable(tmp_path):
    cfg = load_config(
        None, ["--lora.r", "5", "--train.schedule", "linear", "--lora.rank_pattern", "{q_proj: 2}"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", []) == cfg


@pytest.mark.parametrize(
    "args,match",
    [
        (["--train.lrr", "1"], r"unknown key train\.lrr; did you mean 'lr'\?"),
        (["--trian.lr", "1"], r"unknown section 'trian'; did you mean 'train'\?"),
        (["--train.steps", "0"], "train.steps must be >= 1"),
        (["--train.schedule", "wavy"], "train.schedule must be cosine, linear or constant"),
        (["--lora.r", "0"], "r must be a positive integer"),
        (["--train.lr"], "needs a value"),
        (["oops"], "must look like --section.key value"),
    ],
)
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


def test_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(f, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", [])


def test_help_lists_every_field_with_its_doc():
    text = help_text()
    assert "--train.lr (default: 0.002)  Peak learning rate (AdamW)." in text
    assert "--lora.r (default: 16)" in text and "--data.pack" in text


def test_method_alias_and_composition():
    cfg = load_config(None, ["--method", "adalora+loraplus", "--adalora.target_r", "4"])
    assert cfg.train.method == "adalora+loraplus" and cfg.methods == ("adalora", True)
    assert load_config(None, ["--method=loraplus"]).methods == ("lora", True)
    assert load_config(None, []).methods == ("lora", False)



def test_model_shorthand_is_model_path(tmp_path):
    assert load_config(None, ["--model", "some/hf_folder"]).model.path == "some/hf_folder"
    assert load_config(None, ["--model=x.gguf", "--train.steps", "3"]).model.path == "x.gguf"
    with pytest.raises(ConfigError, match=r"override '--steps' must look like --section.key value"):
        load_config(None, ["--steps", "3"])
    with pytest.raises(ConfigError, match=r"^override --model needs a value$"):
        load_config(None, ["--model", "--train.steps", "3"])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--method", "dyloar"], "unknown method 'dyloar'; did you mean 'dylora'"),
        (["--method", "dylora+adalora"], "give one of lora, dylora, adalora, ladder"),
        (
            ["--adalora.init_r", "6"],
            r"adalora.init_r is set but train.method is 'lora'; use --method adalora",
        ),
        (["--method", "dylora", "--ladder.every", "2"], "ladder.every is set but train.method is 'dylora'"),
        (
            ["--loraplus.ratio", "8"],
            "loraplus.ratio is set but train.method is 'lora'; use --method loraplus",
        ),
    ],
)
def test_variant_options_need_their_method(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)
