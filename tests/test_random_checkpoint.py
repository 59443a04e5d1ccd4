"""benchmarks/random_checkpoint.py: random-weight checkpoints of real shapes load like any model folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import lorakit

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "random_checkpoint.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("random_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real_model
def test_a_random_checkpoint_is_written_once_and_loads(script, tmp_path, default_model_dir, monkeypatch):
    monkeypatch.setattr(script, "SHARD_BYTES", 40_000)  # several shards even at the tiny shape
    out = script.checkpoint("tiny", cache_dir=str(tmp_path))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    model, tok = lorakit.load_model(out)
    assert model.config.hidden_size == 64 and len(tok) == model.config.vocab_size
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(model.model.norm.weight, torch.ones(64))
    q, _, report = lorakit.load_quantized(out)  # shard by shard, straight into 4 bits
    assert report.summary()
    mtime = shards[0].stat().st_mtime_ns
    assert script.checkpoint("tiny", cache_dir=str(tmp_path)) == out and shards[0].stat().st_mtime_ns == mtime
    # `lorakit cache` knows it for what it is, and `clean` leaves it (only --all removes it)
    from lorakit.model_cache import clean, entries

    assert [(e.kind, e.stale) for e in entries(tmp_path) if e.path == out] == [("checkpoint", None)]
    assert out not in [e.path for e in clean(tmp_path, dry_run=True)]


@pytest.fixture
def sharded(script, tmp_path, default_model_dir, monkeypatch):
    """A tiny random checkpoint in several shards, copied so each test may damage it."""
    import shutil

    monkeypatch.setattr(script, "SHARD_BYTES", 40_000)
    out = script.checkpoint("tiny", cache_dir=str(tmp_path / "cache"))
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.real_model
def test_bad_checkpoints_fail_before_loading_with_one_line(sharded):
    from lorakit.errors import ModelLoadError

    shards = sorted(sharded.glob("model-*.safetensors"))
    last = shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(
        ModelLoadError, match=r"truncated: tensor '.+' ends at byte [\d,]+, the file has"
    ) as e:
        lorakit.load_quantized(sharded)
    assert "\n" not in str(e.value) and last.name in str(e.value)
    last.unlink()  # missing
    with pytest.raises(
        ModelLoadError, match=f"{last.name}: shard named by model.safetensors.index.json is missing"
    ):
        lorakit.load_quantized(sharded)
    last.write_bytes(b"\xff" * 16)  # not a safetensors file
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        lorakit.load_quantized(sharded)


@pytest.mark.real_model
def test_a_shape_that_does_not_match_the_config_is_named(sharded):
    import json

    from lorakit.errors import ModelLoadError

    config = json.loads((sharded / "config.json").read_text())
    config["intermediate_size"] = 192  # the checkpoint's MLP weights are 128 wide
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError,
        match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) in the checkpoint, the model's config wants",
    ):
        lorakit.load_quantized(sharded)


@pytest.mark.real_model
def test_not_enough_memory_is_said_before_loading_with_the_estimate(sharded, monkeypatch):
    from lorakit.errors import ModelLoadError
    from lorakit.quant.load import MEMORY_ENV

    model, _, _ = lorakit.load_quantized(sharded)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    monkeypatch.setenv(MEMORY_ENV, "0.000001")  # 1 kB
    with pytest.raises(
        ModelLoadError, match=r"needs about 0\.\d\d GB, and 0\.00 GB is available \(\$LORAKIT_MEMORY_LIMIT\)"
    ):
        lorakit.load_quantized(sharded)
    monkeypatch.setenv(MEMORY_ENV, str(2 * nbytes / 1e9))  # room for the model: loads
    lorakit.load_quantized(sharded)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ModelLoadError, match="LORAKIT_MEMORY_LIMIT='lots' is not a number of GB"):
        lorakit.load_quantized(sharded)
