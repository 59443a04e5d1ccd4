"""Which modules a config selects: PEFT's matching rules, as a table of cases."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig, TargetError
from lorakit.targeting import layer_index

from tiny import ConvNet, tiny_gpt2, tiny_llama

L = "model.layers"
CASES = [
    pytest.param(
        dict(targets=["q_proj"]), [f"{L}.0.self_attn.q_proj", f"{L}.1.self_attn.q_proj"], id="suffix"
    ),
    pytest.param(dict(targets=[f"{L}.1.mlp.up_proj"]), [f"{L}.1.mlp.up_proj"], id="exact-name"),
    pytest.param(
        dict(targets=r".*\.1\.self_attn\.(k|v)_proj"),
        [f"{L}.1.self_attn.k_proj", f"{L}.1.self_attn.v_proj"],
        id="regex-fullmatch",
    ),
    pytest.param(dict(targets=r"q_proj"), None, id="regex-is-a-full-match-not-a-search"),
    pytest.param(
        dict(targets=["q_proj", "v_proj"], layers=[0]),
        [f"{L}.0.self_attn.q_proj", f"{L}.0.self_attn.v_proj"],
        id="layers",
    ),
    pytest.param(
        dict(targets=["q_proj"], exclude=[f"{L}.0.self_attn.q_proj"]),
        [f"{L}.1.self_attn.q_proj"],
        id="exclude-list",
    ),
    pytest.param(
        dict(targets="all-linear", exclude=r".*mlp.*|.*\.0\..*"),
        [f"{L}.1.self_attn.{p}_proj" for p in "qkvo"],
        id="exclude-regex",
    ),
    pytest.param(dict(targets=["embed_tokens"]), ["model.embed_tokens"], id="embedding"),
]


@pytest.mark.parametrize("kwargs,expected", CASES)
def test_llama_targets(kwargs, expected):
    model = tiny_llama()
    if expected is None:
        with pytest.raises(TargetError):
            lorakit.select_modules(model, LoraConfig(**kwargs))
    else:
        assert lorakit.select_modules(model, LoraConfig(**kwargs)) == expected


def test_all_linear_excludes_the_output_head():
    names = lorakit.select_modules(tiny_llama(), LoraConfig(targets="all-linear"))
    assert len(names) == 2 * 7 and "lm_head" not in names
    gpt2 = lorakit.select_modules(tiny_gpt2(), LoraConfig(targets="all-linear"))
    assert len(gpt2) == 2 * 4 and all(n.rsplit(".", 1)[-1] in {"c_attn", "c_proj", "c_fc"} for n in gpt2)


def test_all_linear_on_plain_pytorch():
    assert lorakit.select_modules(ConvNet(), LoraConfig(targets="all-linear")) == ["head"]


def test_no_match_lists_nearest_names():
    with pytest.raises(
        TargetError, match=r"matched no module in LlamaForCausalLM.*nearest adaptable module names: q_proj"
    ):
        lorakit.select_modules(tiny_llama(), LoraConfig(targets=["q_prj"]))


def test_a_list_written_as_one_string_gets_a_hint():
    # "--lora.targets q_proj,v_proj" is one regex string, which matches nothing; the message shows the list form
    with pytest.raises(TargetError) as e:
        lorakit.select_modules(tiny_llama(), LoraConfig(targets="q_proj,v_proj"))
    assert "(a string is one regex; a list of names is written [q_proj, v_proj])" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(TargetError) as e:
        lorakit.select_modules(tiny_llama(), LoraConfig(targets="q_prj"))
    assert "a string is one regex" not in str(e.value)


def test_unsupported_module_type_is_named():
    with pytest.raises(TargetError, match=r"'model.layers.0.mlp' is a LlamaMLP, which LoRA cannot wrap"):
        lorakit.select_modules(tiny_llama(), LoraConfig(targets=["mlp"]))


def test_grouped_conv_refused_and_model_untouched():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetError, match="groups=2"):
        lorakit.inject(model, LoraConfig(targets=["0"]))
    assert isinstance(model[0], nn.Conv2d) and lorakit.adapter_names(model) == []


def test_existing_lora_internals_are_not_targets():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "a")
    lorakit.inject(model, LoraConfig(targets="all-linear"), "b")
    assert not any("base_layer" in n for n in lorakit.select_modules(model, LoraConfig(targets="all-linear")))
    assert set(model.model.layers[0].self_attn.q_proj.adapters) == {"a", "b"}


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.11.attn.c_attn", "h", 11),
        ("model.layers.2.mlp.experts.7.up", "layers", 2),
        ("lm_head", None, None),
    ],
)
def test_layer_index(name, pattern, expected):
    assert layer_index(name, pattern) == expected


def test_rank_and_alpha_patterns_apply_per_module():
    model = tiny_llama()
    cfg = LoraConfig(
        r=4,
        alpha=8,
        targets="all-linear",
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 7},
        alpha_pattern={"v_proj": 2.0},
    )
    lorakit.inject(model, cfg)
    q1 = model.model.layers[1].self_attn.q_proj.adapters["default"]
    q0 = model.model.layers[0].self_attn.q_proj.adapters["default"]
    v0 = model.model.layers[0].self_attn.v_proj.adapters["default"]
    assert (q1.r, q1.lora_A.shape[0], q1.scaling) == (7, 7, 8 / 7)
    assert (q0.r, q0.scaling) == (4, 2.0)
    assert (v0.r, v0.scaling) == (4, 0.5)


def test_parameter_report_counts_the_seed_formula():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "k_proj"]))
    report = lorakit.parameter_report(model)
    rows = {r["module"]: r for r in report["layers"]}
    q = rows[f"{L}.0.self_attn.q_proj"]
    k = rows[f"{L}.0.self_attn.k_proj"]
    assert (q["d"], q["k"], q["full"], q["lora"]) == (32, 32, 32 * 32, 4 * (32 + 32))
    assert (k["d"], k["k"], k["lora"]) == (16, 32, 4 * (16 + 32))
    assert report["trainable"] == sum(r["lora"] for r in report["layers"])
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert "trainable params" in lorakit.format_report(report)
