"""Run configs: YAML plus --section.key overrides, unknown keys with a suggestion, round trip through config.yaml."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.train.config import load_config, save_config
from lorakit.train.fields import help_text


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


@pytest.mark.parametrize(
    "args,match",
    [
        (["--train.steps", "abc"], r"^--train\.steps: expected an integer, got 'abc'$"),
        (["--train.steps", "2.5"], r"^--train\.steps: expected an integer, got '2\.5'$"),
        (["--train.lr", "fast"], r"^--train\.lr: expected a number, got 'fast'$"),
        (["--train.lr", "inf"], r"^--train\.lr: expected a finite number, got 'inf'$"),
        (["--train.lr", "nan"], r"^--train\.lr: expected a finite number, got 'nan'$"),
        (["--data.chat", "maybe"], r"^--data\.chat: expected true or false, got 'maybe'$"),
        (["--data.pack", "2"], r"^--data\.pack: expected true or false, got '2'$"),
        (
            ["--adalora.total_step", "many"],
            r"^--adalora\.total_step: expected an integer or null, got 'many'$",
        ),
        (["--model.quantize_skip", "[1, 2]"], r"^--model\.quantize_skip: expected a list of strings"),
        (["--lora.r", "big"], r"^--lora\.r: expected an integer, got 'big'$"),
        (["--lora.alpha", "1e999"], r"^--lora\.alpha: expected a finite number, got '1e999'$"),
        (["--lora.rank_pattern", "[4]"], r"^--lora\.rank_pattern: expected a mapping of string -> integer"),
        (
            ["--lora.alpha_pattern", "{q_proj: x}"],
            r"^--lora\.alpha_pattern: expected a mapping of string -> number",
        ),
        (["--lora.layers", "[0, x]"], r"^--lora\.layers: expected a list of integers or null"),
        (["--lora.use_dora", "yes please"], r"^--lora\.use_dora: expected true or false"),
        (["--lora.targets", "[q_proj, 3]"], r"^--lora\.targets: expected a string or a list of strings"),
    ],
)
def test_override_values_are_checked_against_the_field_type(args, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, args)
    assert "\n" not in str(info.value)


def test_override_values_typed_by_the_field():
    cfg = load_config(
        None,
        [
            *("--train.out_dir", "2024", "--train.resume", "null", "--train.lr", "1", "--data.chat", "no"),
            *("--lora.alpha", "16", "--lora.targets", "q_proj", "--model.quantize_skip", "[lm_head, '0']"),
            *("--train.max_grad_norm", "0", "--adalora.total_step", "null", "--data.eval_split", "1e-1"),
            *("--lora.modules_to_save", "lm_head, score"),  # a plain list of strings also takes a,b
        ],
    )
    assert cfg.train.out_dir == "2024" and cfg.train.resume is None  # a str field keeps the text as given
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.data.chat is False
    assert (
        cfg.lora.alpha == 16 and cfg.lora.targets == "q_proj" and cfg.model.quantize_skip == ["lm_head", "0"]
        and cfg.lora.modules_to_save == ["lm_head", "score"]
    )
    assert cfg.train.max_grad_norm == 0.0 and cfg.adalora.total_step is None and cfg.data.eval_split == 0.1
    # a list of numbers takes a,b too (YAML alone would read "64,32" as the number 6432), each item checked
    cfg = load_config(
        None, ["--objective", "embed", "--embed.matryoshka_dims", "64,32", "--embed.matryoshka_weights", "1, 0.5"]
    )
    assert cfg.embed.matryoshka_dims == [64, 32] and cfg.embed.matryoshka_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"^--embed\.matryoshka_dims: expected a list of integers, got '64,x'$"):
        load_config(None, ["--objective", "embed", "--embed.matryoshka_dims", "64,x"])


@pytest.mark.parametrize(
    "text,match",
    [
        ("train:\n  steps: abc\n", r"my\.yaml: train\.steps: expected an integer, got 'abc'$"),
        ("train:\n  steps: 2.0\n", r"my\.yaml: train\.steps: expected an integer, got 2\.0$"),
        ("train:\n  lr: .inf\n", r"my\.yaml: train\.lr: expected a finite number, got inf$"),
        ("train:\n  out_dir: 2024\n", r"my\.yaml: train\.out_dir: expected a string, got 2024$"),
        ("data:\n  chat: 'yes'\n", r"my\.yaml: data\.chat: expected true or false, got 'yes'$"),
        (
            "lora:\n  rank_pattern: [4]\n",
            r"my\.yaml: lora\.rank_pattern: expected a mapping of string -> integer",
        ),
        ("- train\n- lora\n", r"my\.yaml: expected a mapping of sections, got list$"),
        ("just text\n", r"my\.yaml: expected a mapping of sections, got str$"),
        ("train: 5\n", r"my\.yaml: section 'train' must be a mapping, got int$"),
        ("train: [steps, 3]\n", r"my\.yaml: section 'train' must be a mapping, got list$"),
    ],
)
def test_yaml_values_are_checked_against_the_field_type(tmp_path, text, match):
    f = tmp_path / "my.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(f, [])
    assert "\n" not in str(info.value)


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  lr: 2e-4\n  weight_decay: 0\n")  # YAML 1.1 reads 2e-4 as a string
    cfg = load_config(f, [])
    assert cfg.train.lr == 2e-4 and cfg.train.weight_decay == 0.0


def test_unreadable_config_files_are_one_line(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.yaml: not a file"):
        load_config(tmp_path / "dir.yaml", [])
    (tmp_path / "bin.yaml").write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not UTF-8 text"):
        load_config(tmp_path / "bin.yaml", [])
