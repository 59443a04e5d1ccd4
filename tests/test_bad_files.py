"""Hostile and careless adapter files: every one is refused with ONE line that names the file and the key or
tensor at fault, and the model is left exactly as it was (LoRA, AdaLoRA and ladder folders alike)."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LorakitError
from lorakit.variants.adalora import AdaLoraConfig, inject_adalora

from tiny import randomize, tiny_llama


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _refused(path, match, *, allow_pickle=False):
    """Loading `path` onto a fresh tiny Llama raises one LorakitError line matching `match`; the model is as before."""
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(LorakitError, match=match) as info:
        lorakit.load_adapter(model, path, allow_pickle=allow_pickle)
    assert "\n" not in str(info.value), str(info.value)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert lorakit.adapter_names(model) == []
    return str(info.value)


def _edit(path, **changes):
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))  # json writes inf/nan as Infinity/NaN


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    return lorakit.save_adapter(model, tmp_path / "lora")


@pytest.fixture
def adalora_dir(tmp_path):
    model = tiny_llama()
    inject_adalora(model, LoraConfig(targets=["q_proj"]), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    return lorakit.save_adapter(model, tmp_path / "ada")


@pytest.fixture
def ladder_dir(tmp_path):
    model = tiny_llama()
    lorakit.attach_ladder(model, lorakit.LadderConfig(reduction=4, rank=4))
    return lorakit.save_ladder(model, tmp_path / "ladder")


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"lora_alpha": INF}, r"lora_alpha must be a finite number > 0, got inf"),
        ({"lora_alpha": -INF}, r"lora_alpha must be a finite number > 0, got -inf"),
        ({"lora_dropout": INF}, r"lora_dropout must be a finite number in \[0, 1\)"),
        (
            {"alpha_pattern": {"q_proj": INF}},
            r"alpha_pattern\['q_proj'\] must be a finite number > 0, got inf",
        ),
        ({"rank_pattern": [4]}, r"rank_pattern must be a mapping of module pattern -> rank, got list"),
        ({"alpha_pattern": "x"}, r"alpha_pattern must be a mapping of module pattern -> alpha, got str"),
        ({"use_rslora": "false"}, r"use_rslora must be true or false, got 'false'"),
        ({"exclude_modules": 3}, r"exclude_modules must be a string, a list of strings or null, got 3"),
        ({"r": -1}, r"r must be a positive integer, got -1"),
        ({"r": 0}, r"r must be a positive integer, got 0"),
    ],
)
def test_lora_config_values(lora_dir, changes, match):
    _edit(lora_dir, **changes)
    _refused(lora_dir, rf"^{lora_dir / 'adapter_config.json'}: {match}")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"lora_alpha": INF}, r"lora_alpha must be a finite number > 0, got inf"),
        ({"orth_reg_weight": INF}, r"orth_reg_weight must be a finite number >= 0, got inf"),
        ({"beta1": "x"}, r"beta1 must be in \(0, 1\), got 'x'"),
        ({"rank_pattern": [4]}, r"rank_pattern must map '<module>.lora_E' to lists of true/false"),
        ({"alpha_pattern": "x"}, r"alpha_pattern must be a mapping of module pattern -> alpha, got str"),
        ({"init_r": True}, r"init_r must be a positive integer, got True"),
    ],
)
def test_adalora_config_values(adalora_dir, changes, match):
    _edit(adalora_dir, **changes)
    _refused(adalora_dir, rf"^{adalora_dir / 'adapter_config.json'}: {match}")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"temperature": INF}, r"ladder\.temperature must be a finite number > 0, got inf"),
        ({"temperature": "hot"}, r"ladder\.temperature must be a finite number > 0, got 'hot'"),
        ({"rank": 2.5}, r"ladder\.rank must be an int >= 1, got 2\.5"),
    ],
)
def test_ladder_config_values(ladder_dir, changes, match):
    _edit(ladder_dir, **changes)
    _refused(ladder_dir, rf"^{ladder_dir / 'adapter_config.json'}: {match}")


def _as_pickle(path, obj):
    (path / "adapter_model.safetensors").unlink()
    torch.save(obj, path / "adapter_model.bin")


def test_refused_pickle_is_one_line_naming_the_file(lora_dir, tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    _as_pickle(lora_dir, {"x": Evil()})
    msg = _refused(
        lora_dir,
        rf"^{lora_dir / 'adapter_model.bin'}: refused by torch.load\(weights_only=True\)",
        allow_pickle=True,
    )
    assert "GLOBAL posix.system" in msg  # what was refused, from torch's multi-line message
    assert "weights_only` set to `False`" not in msg  # not torch's advice to load it unsafely
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncated", r"adapter_model\.bin: cannot be loaded with weights_only=True"),
        ("not-a-dict", r"adapter_model\.bin: expected a dict of tensors"),
        ("int-keys", r"adapter_model\.bin: expected a dict of tensors"),
    ],
)
def test_bad_pickles_are_one_line(lora_dir, damage, match):
    from safetensors.torch import load_file

    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    _as_pickle(
        lora_dir,
        {"truncated": tensors, "not-a-dict": list(tensors.values()), "int-keys": {1: torch.ones(1)}}[damage],
    )
    if damage == "truncated":
        f = lora_dir / "adapter_model.bin"
        f.write_bytes(f.read_bytes()[:100])
    _refused(lora_dir, match, allow_pickle=True)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: torch.full_like(t, float("nan")), r"has non-finite values \(nan or inf\)"),
        (lambda t: torch.full_like(t, float("inf")), r"has non-finite values \(nan or inf\)"),
        (
            lambda t: torch.ones_like(t, dtype=torch.int32),
            r"has dtype torch\.int32, not a floating-point type",
        ),
        (lambda t: torch.ones_like(t, dtype=torch.bool), r"has dtype torch\.bool, not a floating-point type"),
    ],
    ids=["nan", "inf", "int32", "bool"],
)
def test_non_finite_or_non_float_tensors_are_refused(lora_dir, make, match):
    from safetensors.torch import load_file, save_file

    f = lora_dir / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors[KEY] = make(tensors[KEY])
    save_file(tensors, str(f))
    _refused(lora_dir, rf"^{lora_dir}: {KEY} {match}")


def test_half_precision_files_load(lora_dir):
    from safetensors.torch import load_file, save_file

    f = lora_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    model = tiny_llama()
    lorakit.load_adapter(model, lora_dir)  # converted to the model's dtype, as PEFT does


def test_adalora_and_ladder_tensors_are_checked_too(adalora_dir, ladder_dir):
    from safetensors.torch import load_file, save_file

    for path in (adalora_dir, ladder_dir):
        f = path / "adapter_model.safetensors"
        tensors = load_file(str(f))
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(f))
        _refused(path, rf"^{path}: {key} has non-finite values")
