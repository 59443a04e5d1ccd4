"""Adapter files: bit-exact round trip, atomic saves, and clear errors for bad files that leave the model as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, AdapterFileError, ConfigError, LoraConfig

from tiny import ids, randomize, tiny_llama

TESTS = Path(__file__).parent


def _saved(tmp_path, cfg=None, name="default"):
    model = tiny_llama()
    lorakit.inject(model, cfg or LoraConfig(r=4, targets=["q_proj", "v_proj"]), name)
    randomize(model)
    path = lorakit.save_adapter(model, tmp_path / "adapter", name)
    return model, path


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_roundtrip_is_bit_exact(tmp_path):
    model, path = _saved(tmp_path, LoraConfig(r=4, targets="all-linear", use_dora=True))
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, path)
    ours = lorakit.adapter_state_dict(model)
    theirs = lorakit.adapter_state_dict(fresh)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(model(ids()).logits, fresh(ids()).logits)
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["use_dora"] is True
    keys = load_file(str(path / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys


def test_safetensors_metadata_format_pt(tmp_path):
    from safetensors import safe_open

    _, path = _saved(tmp_path)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def _assert_untouched(model, before):
    after = _state(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert lorakit.adapter_names(model) in ([], ["existing"])


@pytest.fixture
def victim():
    """A model with one adapter already on it, and its full state: a failed load must leave both alone."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["k_proj"]), "existing")
    return model, _state(model)


def test_shape_mismatch_names_module_and_shapes(tmp_path, victim):
    _, path = _saved(tmp_path)
    f = path / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    t[key] = torch.zeros(99, 4)
    save_file(t, str(f), metadata={"format": "pt"})
    model, before = victim
    with pytest.raises(
        AdapterError, match=r"layers\.1\.self_attn\.v_proj\.lora_B has shape \(99, 4\).*needs \(16, 4\)"
    ):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def test_adapter_for_another_model(tmp_path, victim):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    lorakit.inject(wide, LoraConfig(r=4, targets=["q_proj"]))
    lorakit.save_adapter(wide, tmp_path / "wide")
    model, before = victim
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A has shape \(4, 64\)"):
        lorakit.load_adapter(model, tmp_path / "wide")
    _assert_untouched(model, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, victim, damage):
    _, path = _saved(tmp_path)
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    model, before = victim
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: corrupt or truncated"):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def _edit_config(path, **changes):
    cfg_file = path / "adapter_config.json"
    d = json.loads(cfg_file.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    cfg_file.write_text(json.dumps(d))


def test_unknown_config_key_warns(tmp_path):
    _, path = _saved(tmp_path)
    _edit_config(path, shiny_new_option=3)
    with pytest.warns(UserWarning, match="ignoring unknown key 'shiny_new_option'"):
        lorakit.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("key", ["r", "lora_alpha", "target_modules", "peft_type"])
def test_missing_required_key(tmp_path, victim, key):
    _, path = _saved(tmp_path)
    _edit_config(path, **{key: None})
    model, before = victim
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def test_unknown_peft_type(tmp_path, victim):
    _, path = _saved(tmp_path)
    _edit_config(path, peft_type="PREFIX_TUNING")
    model, before = victim
    with pytest.raises(ConfigError, match="unsupported peft_type 'PREFIX_TUNING'"):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def test_bad_json_and_missing_files(tmp_path, victim):
    model, before = victim
    with pytest.raises(AdapterFileError, match="not an adapter folder"):
        lorakit.load_adapter(model, tmp_path / "nope")
    _, path = _saved(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json: not valid JSON"):
        lorakit.load_adapter(model, path)
    _, path = _saved(tmp_path / "x")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors"):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def test_missing_tensor(tmp_path, victim):
    _, path = _saved(tmp_path)
    f = path / "adapter_model.safetensors"
    t = load_file(str(f))
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(t, str(f))
    model, before = victim
    with pytest.raises(AdapterError, match=r"missing tensor .*layers\.0\.self_attn\.q_proj\.lora_B\.weight"):
        lorakit.load_adapter(model, path)
    _assert_untouched(model, before)


def test_duplicate_name_on_load(tmp_path, victim):
    _, path = _saved(tmp_path)
    model, before = victim
    with pytest.raises(AdapterError, match="'existing' already exists"):
        lorakit.load_adapter(model, path, "existing")
    _assert_untouched(model, before)


def test_pickled_bin_refused_unless_allowed(tmp_path, victim):
    model, path = _saved(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    target, before = victim
    with pytest.raises(AdapterFileError, match="pickled adapter refused"):
        lorakit.load_adapter(target, path)
    _assert_untouched(target, before)
    lorakit.load_adapter(target, path, allow_pickle=True)
    torch.testing.assert_close(target(ids()).logits, model(ids()).logits, atol=1e-6, rtol=0)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, victim):
    _, path = _saved(tmp_path)
    (path / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    model, before = victim
    with pytest.raises(AdapterFileError, match="weights_only=True"):
        lorakit.load_adapter(model, path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()
    _assert_untouched(model, before)


def test_save_overwrites_and_keeps_other_files(tmp_path):
    model, path = _saved(tmp_path)
    (path / "README.md").write_text("notes")
    randomize(model, seed=9)
    lorakit.save_adapter(model, path)
    assert (path / "README.md").read_text() == "notes"
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, path)
    assert torch.equal(fresh(ids()).logits, model(ids()).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folders left behind


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import safetensors.torch as st
    import lorakit, lorakit.formats
    from tiny import tiny_llama, randomize

    real = st.save_file
    def dying_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:   # leave a half-written file behind, then die without cleanup
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    lorakit.formats.save_file = dying_save
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model, seed=42)
    lorakit.save_adapter(model, {path!r})
""")


def test_killed_save_leaves_previous_adapter_intact(tmp_path):
    model, path = _saved(tmp_path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER.format(tests=str(TESTS), path=str(path))], capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    after = {f.name: f.read_bytes() for f in path.iterdir()}
    assert after == before
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, path)
    assert torch.equal(fresh(ids()).logits, model(ids()).logits)


def test_full_disk_save_is_one_clear_error_and_keeps_the_old_adapter(tmp_path, monkeypatch):
    """ENOSPC from the OS mid-write (simulated in safetensors' writer, a library call): one line naming the folder,
    the previous adapter byte-identical, no temporary folder left behind."""
    import errno

    import lorakit.formats as formats
    from lorakit.errors import DiskFullError

    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"]))
    out = lorakit.save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formats, "save_file", full_disk)  # the adapter folder writer's call
    randomize(model)
    with pytest.raises(DiskFullError) as info:
        lorakit.save_adapter(model, out)
    msg = str(info.value)
    assert "\n" not in msg and "no space left on device" in msg and str(out) in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
