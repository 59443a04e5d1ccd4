"""`lorakit extract` given bad input: each case fails in one line naming the culprit, before anything is written,
and an earlier adapter in the output folder stays as it was; and the command line around it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_extract import ATTN0, _pair

import lorakit
from lorakit import AdapterError, ConfigError, ModelLoadError
from lorakit.extract import extract

from tiny import tiny_gpt2, tiny_llama

# -- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    base_dir, tuned_dir, _ = _pair(tmp_path, tiny_llama, {f"{ATTN0}.q_proj.weight": 2})
    return base_dir, tuned_dir


def _other(tmp_path, name, model):
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


BAD = {
    "r=0": (lambda t, b, u: (b, u, {"r": 0}), ConfigError, "r must be a whole number of at least 1, got 0"),
    "energy=0": (
        lambda t, b, u: (b, u, {"energy": 0}),
        ConfigError,
        "energy must be a fraction in (0, 1], got 0",
    ),
    "energy>1": (lambda t, b, u: (b, u, {"energy": 1.5}), ConfigError, "got 1.5"),
    "niter<0": (
        lambda t, b, u: (b, u, {"niter": -1}),
        ConfigError,
        "niter must be a whole number of at least 0",
    ),
    "same folder": (lambda t, b, u: (b, b, {}), ConfigError, "are the same folder"),
    "same weights": (
        lambda t, b, u: (b, _other(t, "copy", tiny_llama()), {}),
        ConfigError,
        "has the same weights as",
    ),
    "only a norm changed": (
        lambda t, b, u: (b, _norm_only(t), {}),
        ConfigError,
        "no weight matrix changed, only vectors (model.norm)",
    ),
    "another architecture": (
        lambda t, b, u: (b, _other(t, "gpt2", tiny_gpt2()), {}),
        ConfigError,
        "is llama ['LlamaForCausalLM'] and the tuned model",
    ),
    "another shape": (
        lambda t, b, u: (b, _other(t, "wide", tiny_llama(vocab=130)), {}),
        ModelLoadError,
        "model.embed_tokens.weight has shape (130, 32), the tuned config says (128, 32)",
    ),
    "tied against untied": (
        lambda t, b, u: (b, _other(t, "tied", tiny_llama(tied=True)), {}),
        ModelLoadError,
        "has lm_head.weight, which",
    ),
    "a missing folder": (lambda t, b, u: (b, t / "nope", {}), ModelLoadError, "the tuned model: model path"),
    "a pickled checkpoint": (
        lambda t, b, u: (b, _pickled(t), {}),
        ModelLoadError,
        "no model.safetensors (only safetensors are read",
    ),
    "a truncated checkpoint": (
        lambda t, b, u: (b, _truncated(t, u), {}),
        ModelLoadError,
        "model.safetensors: cannot read it as safetensors",
    ),
    "an unknown target": (
        lambda t, b, u: (b, u, {"targets": ["nope_proj"]}),
        lorakit.TargetError,
        "nope_proj",
    ),
}


def _norm_only(tmp_path):
    base = tiny_llama()
    with torch.no_grad():
        base.model.norm.weight.add_(0.1)
    return _other(tmp_path, "norm", base)


def _truncated(tmp_path, tuned_dir):
    shutil.copytree(tuned_dir, tmp_path / "truncated")
    f = tmp_path / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return tmp_path / "truncated"


def _pickled(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    return tmp_path / "pickled"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_in_one_line_and_writes_nothing(case, pair, tmp_path):
    make, error, message = BAD[case]
    base_dir, tuned_dir, kwargs = make(tmp_path, *pair)
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an earlier adapter there stays as it was
    with pytest.raises(error) as info:
        extract(base_dir, tuned_dir, out, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert [f.name for f in out.iterdir()] == ["adapter_config.json"]
    assert (out / "adapter_config.json").read_text() == "{}"


def test_an_output_path_that_is_a_file_is_refused_and_kept(pair, tmp_path):
    out = tmp_path / "file"
    out.write_text("keep me")
    with pytest.raises(AdapterError, match="exists and is not a folder"):
        extract(*pair, out)
    assert out.read_text() == "keep me"


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_writes_the_adapter_and_reports(pair, tmp_path):
    base_dir, tuned_dir = pair
    cmd = [
        "extract",
        "--model",
        str(base_dir),
        "--tuned",
        str(tuned_dir),
        "--out",
        str(tmp_path / "ad"),
        "-r",
        "8",
    ]
    ok = subprocess.run([sys.executable, "-m", "lorakit", *cmd], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 modules as LoRA (rank 2)" in ok.stdout and f"wrote {tmp_path / 'ad'}" in ok.stdout
    config, _ = lorakit.read_adapter(tmp_path / "ad")
    assert config.r == 2 and config.alpha == 2


def test_cli_bad_call_exits_2_in_one_line(pair, tmp_path, capsys):
    from lorakit.cli import main

    base_dir, tuned_dir = pair
    rc = main(["extract", "--model", str(base_dir), "--tuned", str(base_dir), "--out", str(tmp_path / "x")])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "are the same folder" in lines[0], lines
    assert not (tmp_path / "x").exists()
