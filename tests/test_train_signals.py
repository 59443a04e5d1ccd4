"""Training under trouble: Ctrl-C through the real `lorakit train` command, and a disk that fills up while a
checkpoint is written.

The CLI runs on a tiny Llama saved as a Hugging Face folder with a character-level tokenizer (no download, no
real model), so the whole command takes seconds. The full disk is simulated at the library boundary:
safetensors' `save_file` writes part of its file and then fails as the OS (OSError ENOSPC) or safetensors
itself ("... No space left on device (os error 28)", its real message on a full tmpfs) does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LorakitError
from lorakit.train import checkpoint
from lorakit.train.checkpoint import CheckpointError, latest_checkpoint
from lorakit.train.config import RunConfig, TrainSection
from lorakit.train.loop import TrainingError, train_loop
from lorakit.train.metrics import read_metrics

from tiny import tiny_llama, token_rows

STEPS = 150
INTERRUPT = re.compile(
    r"^lorakit train: error: interrupted at step (\d+); resume with --train\.resume (\S+)$"
)


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory) -> list[str]:
    """`lorakit train` arguments for a tiny model folder and a tiny arithmetic data set (out_dir not included)."""
    from fsdp_worker import char_tokenizer  # a test helper module, as tiny.py

    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    for name, n in (("train", 40), ("eval", 4)):
        rows = [{"prompt": f"{i % 13}+{i % 7}=", "completion": str(i % 13 + i % 7)} for i in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "train",
        *("--model.path", str(root / "model")),
        *("--data.train_file", str(root / "train.jsonl"), "--data.eval_file", str(root / "eval.jsonl")),
        *("--data.max_len", "16", "--lora.r", "2", "--eval.limit", "2", "--eval.max_new_tokens", "3"),
        *("--train.batch_size", "2", "--train.threads", "1", "--train.save_every", "0"),
    ]


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_ctrl_c_saves_a_checkpoint_exits_with_one_line_and_resumes(tiny_run_args, tmp_path):
    args = [*tiny_run_args, "--train.out_dir", str(tmp_path), "--train.steps", str(STEPS)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        # handler: give the child the default disposition, as a terminal's Ctrl-C would find it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not any("loss" in r for r in read_metrics(metrics)):  # a step done (the eval before comes first)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    match = INTERRUPT.match(stderr.strip().splitlines()[-1])
    assert match, stderr[-3000:]
    step, path = int(match[1]), Path(match[2])
    assert 1 <= step < STEPS
    assert path == tmp_path / "checkpoints" / f"step-{step:06d}" == latest_checkpoint(tmp_path)
    assert sorted(_files(path)) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    assert json.loads((path / "state.json").read_text())["step"] == step
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [path.name]  # no temporary folder left
    logged = len(metrics.read_text().splitlines())

    done = subprocess.run(
        [sys.executable, "-m", "lorakit", *args, "--train.resume", "auto"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == step and summary["steps"] == STEPS
    after = [json.loads(line) for line in metrics.read_text().splitlines()[logged:]]
    assert [r["step"] for r in after if "loss" in r] == list(range(step + 1, STEPS + 1))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# A full disk while a checkpoint is written
# ---------------------------------------------------------------------------------------------------------------


def _rows(n=24, seq=10, vocab=128, seed=0):
    return token_rows(n, seq, vocab, seed)


def _cfg(out: Path, **train) -> RunConfig:
    base = dict(out_dir=str(out), steps=6, batch_size=4, lr=1e-2, warmup_steps=1, save_every=2)
    return RunConfig(lora=LoraConfig(r=4, alpha=8), train=TrainSection(**{**base, **train}))


def _model():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    return model


def _disk_fills_up(monkeypatch, error: Exception, *, after: int = 0) -> dict:
    """From call number `after` on, checkpoint's save_file writes half a file, then raises `error`."""
    real = checkpoint.save_file
    seen: dict = {"calls": 0}

    def save_file(tensors, filename, metadata=None):
        seen["calls"] += 1
        if seen["calls"] <= after:
            return real(tensors, filename, metadata=metadata)
        seen["earlier"] = {p.name: _files(p) for p in Path(filename).parents[1].glob("step-*")}
        Path(filename).write_bytes(b"\0" * 4096)  # what got onto the disk before it filled up
        raise error

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    return seen


FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


@pytest.mark.parametrize("error", FULL_DISK, ids=["ENOSPC", "EDQUOT", "safetensors"])
def test_full_disk_keeps_the_previous_checkpoint_and_says_so(monkeypatch, tmp_path, error):
    seen = _disk_fills_up(monkeypatch, error, after=1)  # step 2 is written, step 4 hits the full disk
    with pytest.raises(CheckpointError) as info:
        train_loop(_model(), _rows(), _cfg(tmp_path), pad_id=0, out_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, LorakitError) and "\n" not in msg
    assert msg.startswith(
        f"{tmp_path / 'checkpoints' / 'step-000004'}: cannot write the checkpoint: no space left"
    )
    assert "resume with --train.resume auto" in msg
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-000002"]  # no step-000004, no temporary folder
    assert {"step-000002": _files(ckpts / "step-000002")} == seen["earlier"]  # byte for byte as before

    monkeypatch.undo()  # space freed: the intact checkpoint resumes
    out = train_loop(_model(), _rows(), _cfg(tmp_path, resume="auto"), pad_id=0, out_dir=tmp_path)
    assert out["resumed_from"] == 2


def test_other_write_errors_are_not_reported_as_a_full_disk(monkeypatch, tmp_path):
    _disk_fills_up(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError):
        train_loop(_model(), _rows(), _cfg(tmp_path), pad_id=0, out_dir=tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_full_disk_through_the_cli_is_one_line(monkeypatch, capsys, tiny_run_args, tmp_path):
    from lorakit.cli import main

    _disk_fills_up(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    args = [*tiny_run_args, "--train.out_dir", str(tmp_path), "--train.steps", "3", "--train.save_every", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lorakit train: error: {tmp_path / 'checkpoints' / 'step-000001'}: cannot write the checkpoint: no space "
        "left on device (or quota exceeded); earlier checkpoints are intact, free some space and resume with "
        "--train.resume auto"
    )


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C right after the optimizer step
# ---------------------------------------------------------------------------------------------------------------


def _adapter(model):
    return {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}


def test_sigint_right_after_opt_step_checkpoints_a_consistent_step(tmp_path):
    """A real SIGINT delivered inside optimizer.step() of the 4th step (a torch post-step hook sends it): the
    weights have taken that step. The checkpoint must carry the step number the weights, optimizer and scheduler
    are at, so the resumed run ends with the adapter of an uninterrupted one (same ops, same order: atol 1e-6
    only for BLAS thread scheduling, as in test_train_loop)."""
    import os

    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.manual_seed(0)
    full = _model()
    train_loop(full, _rows(), _cfg(tmp_path / "a", save_every=0), pad_id=0, out_dir=tmp_path / "a")

    calls = {"n": 0}

    def interrupt_after_step(opt, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled by Python at the next bytecode: right here

    torch.manual_seed(0)
    first = _model()
    handle = register_optimizer_step_post_hook(interrupt_after_step)
    try:
        with pytest.raises(TrainingError, match=r"interrupted at step (\d+)") as info:
            train_loop(first, _rows(), _cfg(tmp_path / "b", save_every=0), pad_id=0, out_dir=tmp_path / "b")
    finally:
        handle.remove()
    assert "interrupted at step 4;" in str(info.value)  # the 4th step had updated the weights
    ckpt = latest_checkpoint(tmp_path / "b")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4

    torch.manual_seed(123)
    second = _model()
    out = train_loop(second, _rows(), _cfg(tmp_path / "b", resume="auto"), pad_id=0, out_dir=tmp_path / "b")
    assert out["resumed_from"] == 4
    a, b = _adapter(full), _adapter(second)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_a_second_sigint_inside_a_step_stops_at_once_without_a_checkpoint(tmp_path):
    """The first Ctrl-C waits for the step's end; a second one inside the same step stops at once, and since the
    step is half done (weights updated, counter not), no checkpoint is written."""
    import os

    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = {"n": 0}

    def interrupt_twice(opt, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(interrupt_twice)
    try:
        with pytest.raises(TrainingError, match=r"^interrupted again during step 4: no checkpoint written"):
            train_loop(_model(), _rows(), _cfg(tmp_path, save_every=0), pad_id=0, out_dir=tmp_path)
    finally:
        handle.remove()
    assert latest_checkpoint(tmp_path) is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop put the handler back
