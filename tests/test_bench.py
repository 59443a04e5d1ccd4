"""`lorakit bench`: the comparison benchmark runs on a user's model and prints its table (a smoke run, not a
measurement), and its docs writer replaces only its own section."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.bench import write_docs


def test_write_docs_replaces_only_its_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\nintro\n<!-- x:start -->\nold\n<!-- x:end -->\n\ntail\n")
    write_docs(doc, "new", "<!-- x:start -->", "<!-- x:end -->")
    write_docs(doc, "other", "<!-- y:start -->", "<!-- y:end -->")  # missing markers: appended
    text = doc.read_text()
    assert "old" not in text and "new" in text and text.index("tail") < text.index("other")
    assert text.startswith("# B\n\nintro\n")


@pytest.mark.real_model
def test_lorakit_bench_quick(default_model_dir, tmp_path):
    out = tmp_path / "raw.json"
    cmd = [sys.executable, "-m", "lorakit", "bench", "--quick", "--model", str(default_model_dir)]
    cmd += ["--variants", "lorakit", "bound-ours", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| lorakit / bound-ours |" in proc.stdout
    rounds = json.loads(out.read_text())["rounds"]
    lk, bound = rounds[0]["lorakit"], rounds[0]["bound-ours"]
    assert lk["trainable"] > 0 and bound["trainable"] == 0
    # B = 0 at init: the first step of every variant sees the base model's loss (same model, same batch)
    assert abs(lk["first_loss"] - bound["first_loss"]) < 1e-3
