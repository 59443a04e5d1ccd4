"""`lorakit train`, `eval` and `generate` end to end on the real default model (a short run of the main job)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TRAINED_SAVE_EVERY, TRAINED_STEPS

from lorakit.data.tasks import make_task

from tiny import cli_here

pytestmark = pytest.mark.real_model


def test_train_writes_the_run_folder_and_improves(trained_run):
    out, stdout = trained_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["accuracy"] < 0.2, "the built-in task must be one the base model gets wrong"
    assert after["accuracy"] > before["accuracy"] + 0.3 and after["loss"] < before["loss"]
    assert "accuracy" in stdout and "tokens/s" in stdout and str(out / "adapter") in stdout
    assert (out / "checkpoints" / f"step-{TRAINED_SAVE_EVERY:06d}").is_dir()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["steps"] == TRAINED_STEPS and cfg["lora"]["r"] == 16


def test_saved_config_reruns_as_a_config(trained_run, tmp_path, capsys):
    out, _ = trained_run
    proc = cli_here(
        capsys,
        "train",
        str(out / "config.yaml"),
        "--train.out_dir",
        str(tmp_path),
        "--train.steps",
        "1",
        "--data.n_eval",
        "2",
        "--eval.limit",
        "2",
        "--data.n_train",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_and_generate_with_the_adapter(trained_run, tmp_path, capsys):
    out, _ = trained_run
    _, ev = make_task("dates", n_train=1, n_eval=8, seed=99)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in ev))
    proc = cli_here(
        capsys, "eval", "--data", str(data), "--adapter", str(out / "adapter"), "--max-new-tokens", "16"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exact-match accuracy" in proc.stdout and "eval loss" in proc.stdout
    proc = cli_here(
        capsys, "generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "12", ev[0]["prompt"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()[:4].isdigit()  # an ISO date starts with the year


def test_eval_reads_alpaca_and_csv_files_as_their_jsonl_twin(trained_run, tmp_path, capsys):
    """The same eval examples as JSONL prompt/completion, as an Alpaca JSON array and as a CSV whose columns
    --fields renames: the same loss and accuracy with the trained adapter (the same tokens, so exactly)."""
    import csv

    out, _ = trained_run
    _, ev = make_task("dates", n_train=1, n_eval=6, seed=7)
    (tmp_path / "ev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    alpaca = [{"instruction": e["prompt"], "input": "", "output": e["completion"]} for e in ev]
    (tmp_path / "ev.json").write_text(json.dumps(alpaca, indent=1))
    with open(tmp_path / "ev.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([("question", "answer"), *((e["prompt"], e["completion"]) for e in ev)])
    reports = {}
    for name, extra in (
        ("ev.jsonl", ()),
        ("ev.json", ()),
        ("ev.csv", ("--fields", "{prompt: question, completion: answer}")),
    ):
        proc = cli_here(
            capsys,
            "eval",
            "--data",
            str(tmp_path / name),
            *extra,
            "--adapter",
            str(out / "adapter"),
            "--json",
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        reports[name] = (report["examples"], report["adapter"]["loss"], report["adapter"]["accuracy"])
    assert reports["ev.jsonl"][0] == 6 and reports["ev.jsonl"][2] > 0
    assert reports["ev.json"] == reports["ev.jsonl"] == reports["ev.csv"]
    proc = cli_here(capsys, "eval", "--data", str(tmp_path / "ev.csv"), "--fields", "{prompt: q}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("lorakit eval: error:")
    assert "ev.csv:2: no column 'q' (data.fields maps 'prompt' to it)" in proc.stderr


def test_train_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"question": "x"}\n')
    proc = cli_here(capsys, "train", "--data.train_file", str(bad), "--train.out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lorakit train: error:")
    assert "bad.jsonl:2: unknown fields" in proc.stderr
    proc = cli_here(capsys, "train", "--train.lrr", "1")
    assert proc.returncode == 2 and "did you mean 'lr'?" in proc.stderr
