"""Short training runs on the tiny models (`lorakit.train.run.run_training` and `train_loop` end to end), and what
checks them, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from tiny import tiny_llama, token_rows, write_jsonl


def addition_run(tmp_path, *overrides: str, device: str | None = None, callbacks=None, dtype=None):
    """`lorakit train` through `run_training` on a tiny Llama with a character tokenizer, learning "i+1=" ->
    "i+1" from JSONL files in tmp_path (32 train, 8 eval rows); `overrides` are more `--section.key value`s.
    Returns (summary, model)."""
    import json

    from fsdp_worker import char_tokenizer

    from lorakit.train.config import load_config
    from lorakit.train.run import run_training

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(40)]
    for name, part in (("train", rows[:32]), ("eval", rows[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = load_config(
        None,
        [
            *(
                "--data.train_file",
                str(tmp_path / "train.jsonl"),
                "--data.eval_file",
                str(tmp_path / "eval.jsonl"),
            ),
            *("--data.chat", "false", "--data.max_len", "16", "--train.out_dir", str(tmp_path / "run")),
            *("--train.batch_size", "4", "--eval.max_new_tokens", "2", "--eval.limit", "4"),
            *overrides,
        ],
    )
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    return run_training(cfg, model=model, tokenizer=char_tokenizer(), callbacks=callbacks), model


def pairs_run(tmp_path, *overrides: str, objective: str = "dpo", callbacks=None):
    """`run_training` with a preference `objective` (dpo: at beta 0.5) on a tiny Llama and a character tokenizer:
    "i+1=" answered with the sum preferred to its echo "i+1" (32 train pairs, 8 eval, JSONL files in tmp_path);
    `overrides` are more `--section.key value`s. Returns (summary, model)."""
    from fsdp_worker import char_tokenizer

    from lorakit.train.config import load_config
    from lorakit.train.run import run_training

    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": f"{i}+1"} for i in range(40)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "eval.jsonl", rows[32:])
    cfg = load_config(
        None,
        [
            *("--objective", objective, "--data.train_file", str(tmp_path / "train.jsonl")),
            *("--data.eval_file", str(tmp_path / "eval.jsonl"), "--data.chat", "false"),
            *("--data.max_len", "16", "--train.out_dir", str(tmp_path / "run"), "--train.batch_size", "4"),
            *("--eval.max_new_tokens", "2", "--eval.limit", "4", "--train.lr", "1e-2"),
            *(("--dpo.beta", "0.5") if objective == "dpo" else ()),
            *overrides,
        ],
    )
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    return run_training(cfg, model=model, tokenizer=char_tokenizer(), callbacks=callbacks), model


def eval_pairs_setup(tmp_path):
    """For `lorakit eval` on pairs: a tiny Llama saved with a character tokenizer in tmp_path/model, a file of 5
    addition pairs ("i+1=": the sum preferred to the echo). (model, tokenizer, pairs file, the eval arguments
    without --adapter)."""
    from fsdp_worker import char_tokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": f"{i}+1"} for i in range(5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--no-chat",
        "--max-new-tokens",
        "2",
    ]
    return model, tok, data, args


def resumed_equals_uninterrupted(
    tmp_path, lora, *, data_init: bool, make=None, **train
) -> tuple[nn.Module, nn.Module]:
    """Train a tiny Llama (or `make()`) with `lora` for 6 steps, and again interrupted at step 4 and resumed from
    its step-3 checkpoint: both runs' adapters equal to 1e-6 (the same ops on the same data, up to BLAS thread
    scheduling). `data_init`: the method reads the run's first batches (EVA, CorDA, LoRA-GA). Returns
    (uninterrupted, resumed)."""
    from pathlib import Path

    import pytest

    import lorakit
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.loop import TrainingError, train_loop
    from lorakit.train.methods import make_method
    from lorakit.train.schedule import init_batches

    def cfg(out, **kw):
        base = dict(out_dir=str(out), steps=6, batch_size=4, lr=1e-2, warmup_steps=0, save_every=0, **train)
        return RunConfig(lora=lora, train=TrainSection(**{**base, **kw}))

    rows = token_rows()

    def run(c, **kw):
        model, method = (make or tiny_llama)(), make_method(c)
        if data_init:
            method.batches = lambda: init_batches(rows, c, 0)
        method.prepare(model, None)
        train_loop(model, rows, c, pad_id=0, out_dir=Path(c.train.out_dir), method=method, **kw)
        return model

    full = run(cfg(tmp_path / "a"))

    def interrupt(rec):
        if rec.get("step") == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="interrupted at step 4"):
        run(cfg(tmp_path / "b", save_every=3), callbacks=[interrupt])
    second = run(cfg(tmp_path / "b", resume="auto"))
    a, b = lorakit.adapter_state_dict(full), lorakit.adapter_state_dict(second)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    return full, second


def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean token loss over its labelled tokens, from the model's full logits (no gradient): the
    independent value the preference objectives' sft_weight terms are checked against."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return nll.sum(1) / (labels != -100).sum(1)
