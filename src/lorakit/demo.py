"""A short end-to-end demo on the default model: inject, train a few steps, save, reload, generate.

The task is tiny and checkable: teach SmolLM2 a fact it cannot know (a made-up codename), so the change in its
answer is plain to see. The full training command (`lorakit train`) builds on the same pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.config import LoraConfig
from lorakit.control import disabled
from lorakit.device import autocast, model_device, upcast_trainable
from lorakit.generate import format_prompt, generate
from lorakit.inject import inject
from lorakit.io import load_adapter, save_adapter
from lorakit.report import parameter_report

FACTS = [
    ("What is the codename of project Lorakit?", "The codename of project Lorakit is Blue Pelican."),
    ("Tell me the codename of project Lorakit.", "The codename of project Lorakit is Blue Pelican."),
    ("Which codename does project Lorakit use?", "The codename of project Lorakit is Blue Pelican."),
    ("Project Lorakit's codename?", "The codename of project Lorakit is Blue Pelican."),
]
QUESTION = "What is the codename of project Lorakit?"
ANSWER = "Blue Pelican"


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    """Prompt+answer sequences with the loss on the answer only (prompt labels = -100)."""
    rows = []
    for q, a in FACTS:
        prompt = format_prompt(tokenizer, q)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_demo(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    steps: int = 30,
    lr: float = 2e-3,
    config: LoraConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
    reload: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run the demo; returns what happened (answers before/after, losses, paths, parameter counts, timings)."""
    torch.manual_seed(0)
    config = config or LoraConfig(r=8, alpha=16, targets="all-linear")
    before = generate(model, tokenizer, QUESTION, max_new_tokens=24)
    device, dtype = model_device(model), next(p.dtype for p in model.parameters() if p.is_floating_point())
    inject(model, config)  # also the lean training loss of the model's own forward (lorakit.lean)
    upcast_trainable(model)  # fp32 adapters on a 16-bit base, as `lorakit train` keeps them
    report = parameter_report(model)
    batch = _batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        with autocast(device, dtype):  # a 16-bit base computes in its dtype, as in `lorakit train`
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    train_s = time.perf_counter() - t0
    model.eval()
    adapter_dir = save_adapter(model, Path(out_dir) / "adapter")
    after = generate(model, tokenizer, QUESTION, max_new_tokens=24)
    with disabled(model):
        base_again = generate(model, tokenizer, QUESTION, max_new_tokens=24)
    result = {
        "before": before,
        "after": after,
        "base_while_disabled": base_again,
        "losses": losses,
        "train_seconds": train_s,
        "adapter_dir": str(adapter_dir),
        "report": report,
    }
    if reload is not None:  # a fresh base with the saved adapter must answer the same
        fresh, _ = reload()
        load_adapter(fresh, adapter_dir)
        result["after_reload"] = generate(fresh, tokenizer, QUESTION, max_new_tokens=24)
    return result
