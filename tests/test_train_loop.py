"""The training loop on a tiny model: it learns, resumes exactly, stops on NaN, saves atomically, refuses a
checkpoint of another base model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.train.checkpoint import CheckpointError, latest_checkpoint
from lorakit.train.config import RunConfig, TrainSection
from lorakit.train.loop import TrainingError, train_loop
from lorakit.train.schedule import batch_order, lr_factor

from tiny import tiny_llama, token_rows

# Resume: the same ops on the same data in the same order; only the process differs, so the adapters must agree
# to the last bit on the same machine. We allow 1e-6 for safety across BLAS thread scheduling.
RESUME_ATOL = 1e-6


def _rows(n=24, seq=10, vocab=128, seed=0):
    return token_rows(n, seq, vocab, seed)


def _cfg(tmp_path, **train):
    base = dict(out_dir=str(tmp_path), steps=6, batch_size=4, lr=1e-2, warmup_steps=1, save_every=0)
    return RunConfig(
        lora=LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.1),
        train=TrainSection(**{**base, **train}),
    )


def _model():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.1))
    return model


def _adapter(model):
    return {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}


def test_loss_goes_down_and_metrics_are_written(tmp_path):
    model = _model()
    cfg = _cfg(tmp_path, steps=20, lr=3e-2)
    seen = []
    result = train_loop(
        model, _rows(n=4), cfg, pad_id=0, out_dir=tmp_path, callbacks=[seen.append]
    )  # memorise 4 rows
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21)) and lines == seen
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.2  # 20 steps of memorising 4 rows: ~4.8 -> ~4.5
    assert result["tokens"] > 0 and all(k in lines[0] for k in ("lr", "tokens_per_s", "grad_norm"))


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path):
    torch.manual_seed(0)
    full = _model()
    train_loop(full, _rows(), _cfg(tmp_path / "a"), pad_id=0, out_dir=tmp_path / "a")

    torch.manual_seed(0)
    first = _model()

    def interrupt(rec):
        if rec.get("step") == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="interrupted at step 4; resume with"):
        train_loop(
            first, _rows(), _cfg(tmp_path / "b"), pad_id=0, out_dir=tmp_path / "b", callbacks=[interrupt]
        )
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    second = _model()
    out = train_loop(second, _rows(), _cfg(tmp_path / "b", resume="auto"), pad_id=0, out_dir=tmp_path / "b")
    assert out["resumed_from"] == 4
    a, b = _adapter(full), _adapter(second)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=RESUME_ATOL, rtol=0)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    """NaN in one B matrix stops the run at step 1, before any update. Whether the loss or only the gradients
    come out NaN depends on the CPU: on AVX-512, torch's attention kernel drops NaN scores in its vector max,
    so the first loss is finite while every gradient is NaN."""
    model = _model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.fill_(float("nan"))
    before = _adapter(model)
    with pytest.raises(TrainingError, match=r"(loss|gradient norm) became nan at step 1\b.*lower train\.lr"):
        train_loop(model, _rows(), _cfg(tmp_path), pad_id=0, out_dir=tmp_path)
    after = _adapter(model)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_B" not in k)  # B holds the NaNs


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_non_finite_gradients_with_a_finite_loss_stop_before_the_update(tmp_path, max_grad_norm):
    """A finite loss with a NaN gradient (here one entry, put there by a hook) must not reach the optimizer:
    the run stops at that step with one line, and every adapter weight is as it was."""
    model = _model()
    a = model.model.layers[1].mlp.down_proj.adapters["default"].lora_A
    a.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    before = _adapter(model)
    with pytest.raises(TrainingError, match=r"gradient norm became nan at step 1 \(loss [0-9.]+\); the step"):
        train_loop(model, _rows(), _cfg(tmp_path, max_grad_norm=max_grad_norm), pad_id=0, out_dir=tmp_path)
    after = _adapter(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_another_base_model_is_refused(tmp_path):
    model = _model()
    train_loop(
        model, _rows(), _cfg(tmp_path, save_every=2), pad_id=0, out_dir=tmp_path, base_model_id="base-A"
    )
    ckpt = latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="made with base model 'base-A', but this run uses 'base-B'"):
        train_loop(
            _model(),
            _rows(),
            _cfg(tmp_path, resume=str(ckpt)),
            pad_id=0,
            out_dir=tmp_path,
            base_model_id="base-B",
        )


def test_schedules():
    cfg = RunConfig(train=TrainSection(steps=110, warmup_steps=10, schedule="cosine"))
    assert lr_factor(0, cfg) == pytest.approx(1 / 11) and lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5) and lr_factor(109, cfg) < 0.01
    cfg.train.schedule = "linear"
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    cfg.train.schedule = "constant"
    assert lr_factor(100, cfg) == 1.0


def test_batch_order_covers_each_epoch_once_and_shards_by_rank():
    cfg = RunConfig(train=TrainSection(batch_size=3, grad_accum=2, seed=5))
    n = 12
    one = [i for s in range(2) for m in range(2) for i in batch_order(n, s, m, cfg)]
    assert sorted(one[:12]) == list(range(12))
    two = [
        i
        for s in range(1)
        for m in range(2)
        for r in range(2)
        for i in batch_order(n, s, m, cfg, world=2, rank=r)
    ]
    assert sorted(two) == list(range(12))  # one step on 2 ranks covers the same examples as 2 steps on 1


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    """Non-reentrant checkpointing recomputes the forward (with the same dropout RNG state) in backward: the same
    numbers in the same order, so the adapters agree to float32 rounding (atol 1e-6)."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _model()
        train_loop(
            model,
            _rows(),
            _cfg(tmp_path / str(ckpt), steps=3, grad_checkpointing=ckpt),
            pad_id=0,
            out_dir=tmp_path / str(ckpt),
        )
        results.append(_adapter(model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-6, rtol=0)


def test_bf16_training_runs_and_keeps_dtype(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    out = train_loop(model, _rows(), _cfg(tmp_path, steps=3), pad_id=0, out_dir=tmp_path)
    assert math.isfinite(out["last"]["loss"])
    assert all(p.dtype == torch.bfloat16 for p in lorakit.adapter_parameters(model))


def _damage(ckpt, file: str) -> None:
    f = ckpt / file
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("file", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path, caplog, file):
    """A run killed while the disk was failing left a truncated newest checkpoint: "auto" warns and resumes from
    the newest intact one, and ends with the adapter of an uninterrupted run (same tolerance as above)."""
    torch.manual_seed(0)
    full = _model()
    train_loop(full, _rows(), _cfg(tmp_path / "a"), pad_id=0, out_dir=tmp_path / "a")

    torch.manual_seed(0)
    train_loop(_model(), _rows(), _cfg(tmp_path / "b", save_every=2), pad_id=0, out_dir=tmp_path / "b")
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    _damage(ckpts / "step-000004", file)
    damaged = (ckpts / "step-000004" / file).read_bytes()

    torch.manual_seed(123)
    second = _model()
    with caplog.at_level("WARNING", logger="lorakit"):
        out = train_loop(
            second, _rows(), _cfg(tmp_path / "b", resume="auto"), pad_id=0, out_dir=tmp_path / "b"
        )
    assert out["resumed_from"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        str(ckpts / "step-000004" / file) in w and f"resuming from {ckpts / 'step-000002'}" in w
        for w in warned
    ), warned
    assert (ckpts / "step-000004" / file).read_bytes() == damaged  # left as it was
    a, b = _adapter(full), _adapter(second)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=RESUME_ATOL, rtol=0)


def test_resume_auto_with_no_intact_checkpoint_is_one_line_and_changes_nothing(tmp_path):
    train_loop(_model(), _rows(), _cfg(tmp_path, save_every=2), pad_id=0, out_dir=tmp_path)
    ckpts = tmp_path / "checkpoints"
    _damage(ckpts / "step-000002", "trainable.safetensors")
    _damage(ckpts / "step-000004", "optimizer.pt")
    model = _model()
    before = _adapter(model)
    with pytest.raises(CheckpointError) as info:
        train_loop(model, _rows(), _cfg(tmp_path, resume="auto"), pad_id=0, out_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{ckpts}: no intact checkpoint to resume from")
    assert str(ckpts / "step-000004" / "optimizer.pt") in msg
    assert all(torch.equal(before[k], v) for k, v in _adapter(model).items())


def test_resume_from_a_named_truncated_checkpoint_is_one_line(tmp_path):
    train_loop(_model(), _rows(), _cfg(tmp_path, save_every=2), pad_id=0, out_dir=tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-000004"
    _damage(ckpt, "optimizer.pt")
    model = _model()
    before = _adapter(model)
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'optimizer.pt'}: cannot be loaded") as info:
        train_loop(model, _rows(), _cfg(tmp_path, resume=str(ckpt)), pad_id=0, out_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in _adapter(model).items())  # nothing half-restored


def test_an_eval_set_emptied_by_truncation_reports_no_loss_not_zero(tmp_path, caplog):
    """Every eval prompt is longer than data.max_len (16), so truncation leaves no eval token to score: the run
    warns at the start and reports no eval loss, instead of a mean over nothing printed as 0.0000."""
    from runs import addition_run

    long = [{"prompt": "what is " * 3 + f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    with caplog.at_level("WARNING", logger="lorakit"):
        summary, _ = addition_run(
            tmp_path,
            "--train.steps",
            "2",
            "--train.eval_every",
            "1",
            "--data.eval_file",
            str(tmp_path / "long.jsonl"),
        )
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "no eval example has a token left to evaluate after truncation to 16 tokens" in w for w in warned
    )
    assert "loss" not in summary["before"] and "loss" not in summary["after"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_loss" in r for r in records)
    assert summary["data"]["eval"]["truncated"] == 4


def test_eval_loss_of_nothing_is_none():
    from lorakit.train.evaluate import eval_loss

    assert eval_loss(tiny_llama(), [], pad_id=0) is None
