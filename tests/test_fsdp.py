"""FSDP2 (`train.fsdp: true`) under torchrun with 2 CPU processes (gloo), through `run_training` (the `lorakit train`
path; tests/fsdp_worker.py) on a tiny Llama: sharding, clipping, eval with generation during and after training,
collective checkpoint and adapter saves, resume.

* 2 FSDP processes vs 1 process with the same global batch (2 x 4 examples per step, 4 steps, lr 1e-2, clipping
  at 0.05 on every step). FSDP averages the ranks' gradients with a reduce-scatter and sums the clipping norm
  from shards, one process sums two accumulated halves: the same numbers added in another order, which differ
  by float32 rounding (~1e-7 relative). AdamW divides each gradient by its own running RMS, so an element whose
  gradient is within rounding of zero can move by a visibly different fraction of lr. Measured: all but one of
  ~5k adapter elements agree within 1e-6 (as in test_ddp.py), the outlier by 5e-6. We require 99.9% of
  elements within 1e-6 and all within 2e-5 (0.2% of lr); grad norms and eval losses within 1e-5 relative.
* An FSDP checkpoint resumed by 2 FSDP processes: the same ops in the same order as the uninterrupted run, so
  the adapters agree to the last bit (we allow 1e-7). Resumed by 1 process (the checkpoint holds full tensors,
  not shards): the last 2 steps run unsharded, within 1e-6 of the FSDP run.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train.distributed import transformer_blocks

from tiny import tiny_gpt2, tiny_llama

WORKER = str(Path(__file__).parent / "fsdp_worker.py")
ADAPTER = Path("adapter") / "adapter_model.safetensors"


def _run(data: Path, *runs: str, procs: int) -> None:
    """The worker with `procs` processes, training `runs` (FOLDER or FOLDER=CHECKPOINT) one after the other."""
    accum = str(2 // procs)  # same global batch: 2 processes x 1 micro-batch = 1 process x 2
    cmd = [sys.executable, WORKER, str(data), accum, *runs]
    if procs > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29541"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for name, n in (("train", 32), ("eval", 6)):
        rows = []
        for _ in range(n):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            rows.append(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
        (data / f"{name}.jsonl").write_text("".join(rows))
    ckpt = root / "two" / "checkpoints" / "step-000002"
    # the resumed runs start from a fresh model and an empty run folder: all state comes from the checkpoint
    _run(data, f"{root / 'two'}", f"{root / 'resumed2'}={ckpt}", procs=2)
    _run(data, f"{root / 'one'}", f"{root / 'resumed1'}={ckpt}", procs=1)
    one, two, resumed2, resumed1 = (root / n for n in ("one", "two", "resumed2", "resumed1"))
    return {"one": one, "two": two, "resumed2": resumed2, "resumed1": resumed1}


def test_two_fsdp_processes_equal_one_process(runs):
    one, two = runs["one"], runs["two"]
    a, b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))  # full tensors, not shards
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff <= 1e-6).float().mean() >= 0.999, f"{(diff > 1e-6).sum()} of {diff.numel()} differ by >1e-6"
    assert diff.max() <= 2e-5, diff.max()
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # training moved B off zero

    m1, m2 = _metrics(one), _metrics(two)
    norms1 = [r["grad_norm"] for r in m1 if "grad_norm" in r]
    norms2 = [r["grad_norm"] for r in m2 if "grad_norm" in r]
    assert len(norms2) == 4 and min(norms2) > 0.05  # the global norm (all shards) and above the clip: clipped
    assert norms2 == pytest.approx(norms1, rel=1e-5)
    evals1 = [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in m1 if "eval_loss" in r]
    evals2 = [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in m2 if "eval_loss" in r]
    assert [e[0] for e in evals2] == [0, 2, 4]  # before, during training (every rank evaluates), after
    for (s1, loss1, acc1), (s2, loss2, acc2) in zip(evals1, evals2, strict=True):
        assert s1 == s2 and loss2 == pytest.approx(loss1, rel=1e-5) and acc2 == acc1

    summary = json.loads((two / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    cfg = json.loads((two / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]  # rank 0 alone wrote


def test_fsdp_checkpoint_holds_full_tensors_like_a_single_process_one(runs):
    a = runs["one"] / "checkpoints" / "step-000002"
    b = runs["two"] / "checkpoints" / "step-000002"
    ta, tb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert ta.keys() == tb.keys() and all(ta[k].shape == tb[k].shape for k in ta)
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert (
        oa["scheduler"] == ob["scheduler"]
        and oa["optimizer"]["param_groups"] == ob["optimizer"]["param_groups"]
    )
    for idx, state in oa["optimizer"]["state"].items():
        for key, value in state.items():
            other = ob["optimizer"]["state"][idx][key]
            assert type(other) is torch.Tensor and other.shape == value.shape, (idx, key)


def test_fsdp_checkpoint_resumes_exactly_under_fsdp(runs):
    two, resumed = runs["two"], runs["resumed2"]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 2
    assert [r["step"] for r in _metrics(resumed) if "loss" in r] == [3, 4]
    a, b = load_file(str(two / ADAPTER)), load_file(str(resumed / ADAPTER))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-7, rtol=0)
    last = [r["grad_norm"] for r in _metrics(two) if "grad_norm" in r][2:]
    assert [r["grad_norm"] for r in _metrics(resumed) if "grad_norm" in r] == pytest.approx(last, rel=1e-6)


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    two, resumed = runs["two"], runs["resumed1"]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 2
    a, b = load_file(str(two / ADAPTER)), load_file(str(resumed / ADAPTER))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_transformer_blocks_are_the_decoder_layers():
    llama = tiny_llama()
    lorakit.inject(llama, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    assert transformer_blocks(llama) == list(llama.model.layers)
    gpt2 = tiny_gpt2()
    lorakit.inject(gpt2, lorakit.LoraConfig(r=2, targets=["c_attn"]))
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h)
    assert transformer_blocks(tiny_llama()) == []  # no LoRA layers: no blocks found


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one, in this process: FSDP2 then shards over a single rank (DTensors all the same)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ctrl_c_under_fsdp_writes_no_checkpoint_and_names_the_newest(one_process_group, tmp_path):
    from lorakit.data.tokenize import IGNORE, Encoded
    from lorakit.train.checkpoint import is_sharded, latest_checkpoint
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.distributed import shard_model
    from lorakit.train.loop import TrainingError, train_loop

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert shard_model(model) == 2 and is_sharded(model)
    g = torch.Generator().manual_seed(0)
    rows = [
        Encoded(ids, [IGNORE] * 3 + ids[3:]) for ids in torch.randint(0, 128, (16, 10), generator=g).tolist()
    ]
    cfg = RunConfig(train=TrainSection(out_dir=str(tmp_path), steps=6, batch_size=4, save_every=2))

    def interrupt(rec):
        if rec.get("step") == 3:
            raise KeyboardInterrupt

    newest = tmp_path / "checkpoints" / "step-000002"
    msg = f"interrupted after step 3 (FSDP writes no checkpoint on interrupt); resume from {newest} with"
    with pytest.raises(TrainingError, match=re.escape(msg)):
        train_loop(model, rows, cfg, pad_id=0, out_dir=tmp_path, callbacks=[interrupt])
    assert latest_checkpoint(tmp_path) == newest
