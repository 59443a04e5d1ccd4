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
