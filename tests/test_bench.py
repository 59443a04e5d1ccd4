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


def test_on_a_gpu_the_memory_figure_is_peak_gpu_memory():
    from lorakit.bench import interpretation, summarize

    def res(step, gpu, rss):
        return {
            "step_s": step, "peak_gpu_gb": gpu, "load_gpu_gb": gpu / 2, "peak_rss_gb": rss, "load_rss_gb": rss,
            "train_peak_gb": rss, "trainable": 10, "first_loss": 1.0,
        }  # fmt: skip

    rounds = [{"lorakit": res(1.0, 4.0, 9.0), "peft": res(2.0, 8.0, 3.0)} for _ in range(2)]
    table, ratios = summarize(rounds, ["lorakit", "peft"])
    assert "peak GPU memory, GB" in table and "RSS" not in table
    assert ratios["lorakit/peft"]["mem"] == [0.5, 0.5]  # from GPU memory, not from RSS (which says 3.0)
    assert "0.500× its peak GPU memory (smaller in every round)" in interpretation(ratios)
    for r in rounds:  # CPU workers report no GPU memory: RSS again
        for v in r.values():
            v["peak_gpu_gb"] = None
    table, ratios = summarize(rounds, ["lorakit", "peft"])
    assert "peak RSS, GB" in table and ratios["lorakit/peft"]["mem"] == [3.0, 3.0]


@pytest.mark.real_model
def test_bench_scale_decode_workers_greedy_decode_the_same_tokens_count(default_model_dir):
    """benchmarks/bench_scale.py's decode worker (a smoke run on the default model, not a measurement): our NF4
    base and bitsandbytes' each load, prefill and decode, and report positive rates."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    for variant in ("lorakit-nf4", "bnb"):
        cmd = [sys.executable, str(script), "worker", "--variant", variant, "--path", str(default_model_dir)]
        proc = subprocess.run(
            cmd + ["--tokens", "2", "--prompt", "4"], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["variant"] == variant and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert 0 < r["rss_after_load_gb"] <= r["load_peak_gb"]


def test_profile_step_puts_each_operator_in_its_category():
    """benchmarks/profile_step.py's categories: the model's own loss (log-softmax) is the loss, not attention,
    whose pattern also ends in "softmax"."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.pop(0)
    cases = {
        "aten::_log_softmax": "loss",
        "aten::_log_softmax_backward_data": "loss",
        "aten::nll_loss_forward": "loss",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
        "aten::_softmax": "attention",
        "aten::mm": "matmuls",
        "aten::addmm_": "matmuls",
        "aten::silu_backward": "norms and activations",
        "_LoraLinearBackward": "autograd and Python",
        "aten::empty": "allocation",
    }
    assert {name: profile_step.categorize(name) for name in cases} == cases


@pytest.mark.real_model
def test_profile_step_profiles_lorakit_peft_and_the_bound_side_by_side(default_model_dir, tmp_path):
    """A smoke run of benchmarks/profile_step.py on the default model (1×16 tokens; not a measurement): one
    column a variant, the categories add up to the total, and the floor line is there."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    chart = tmp_path / "profile.png"
    cmd = [sys.executable, str(script), "--model", str(default_model_dir), "--batch", "1", "--seq", "16"]
    proc = subprocess.run(
        cmd + ["--steps", "1", "--plot", str(chart)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "| category | `lorakit train`'s step | PEFT | frozen-base bound |" in lines
    rows = [
        line for line in lines if line.startswith("| ") and "(" in line and "matmuls + attention" not in line
    ]
    totals = next(line for line in lines if line.startswith("| **all operators**"))
    for col, total in enumerate(totals.replace("*", "").split("|")[2:5]):
        parts = sum(float(row.split("|")[2 + col].split()[0]) for row in rows)
        assert abs(parts - float(total)) <= 0.002 * len(rows)  # each cell rounded to 1 ms
    assert any("matmuls and attention alone" in line for line in lines)
    assert chart.stat().st_size > 0


def test_bench_head_checks_every_chunk_against_transformers_loss_then_times_it():
    """A smoke run of benchmarks/bench_head.py (1×33 tokens; not a measurement). Before timing, the script asserts
    that the chunked loss and its ∂h equal transformers' at every chunk size, including chunks that do not divide
    the rows; so a wrong chunk boundary fails here. Then one table row a chunk size, the default among them."""
    from pathlib import Path

    from lorakit.head import _chunk_rows

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head.py"
    cmd = [sys.executable, str(script), "--batch", "1", "--seq", "33", "--chunks", "7", "32", "--rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:3] for line in proc.stdout.splitlines() if line.startswith("| lorakit")]
    assert [int(n) for _, n in rows] == sorted([7, 32, _chunk_rows(49152)])
    assert any(line.startswith("| transformers (full logits) | 33 |") for line in proc.stdout.splitlines())
    bad = subprocess.run(cmd[:2] + ["--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.real_model
def test_bench_interleaved_alternates_steps_of_the_variants_in_one_process(default_model_dir):
    """A smoke run of benchmarks/bench_interleaved.py on the default model (1×16 tokens; not a measurement): each
    round times one step of every variant, and the ratio row counts the rounds. Fewer than two variants is refused."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_interleaved.py"
    cmd = [sys.executable, str(script), "--model", str(default_model_dir), "--batch", "1", "--seq", "16"]
    proc = subprocess.run(
        cmd + ["--rounds", "3", "--variants", "lorakit", "bound"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("round ") and "lorakit" in line and "bound" in line for line in lines) == 3
    ratio = next(line for line in lines if line.startswith("| frozen-base bound |") and "×" in line)
    assert ratio.rstrip(" |").endswith("of 3")
    bad = subprocess.run(cmd + ["--variants", "lorakit"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--variants" in bad.stderr.strip().splitlines()[-1]
