"""Quick start: the README's Python tour, runnable end to end on the default model (about 30 s on 2 CPU cores).

.venv/bin/python examples/quickstart.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lorakit-quickstart-"))
model, tokenizer = (
    lorakit.load_model()
)  # SmolLM2-135M-Instruct from the bundled GGUF (cached after the first run)

lorakit.inject(model, LoraConfig(r=16, alpha=32, targets="all-linear"))
print(lorakit.format_report(lorakit.parameter_report(model), max_rows=7))

# Train a few steps on one sentence: the adapter's parameters are exactly the ones that require grad.
batch = tokenizer(["LoRA adapters are small, so many of them fit on one base model."], return_tensors="pt")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(5):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")
model.eval()
lorakit.save_adapter(model, out / "adapter")

# Many adapters on one base: load the same files again under another name, then switch and mix.
lorakit.load_adapter(model, out / "adapter", "other", activate=False)
ids = batch["input_ids"]
with torch.no_grad():
    lorakit.set_active(model, "default")
    a = model(ids).logits
    lorakit.set_active(model, {"default": 0.5, "other": 0.5})  # two halves of the same adapter = the adapter
    mixed = model(ids).logits
    with lorakit.disabled(model):
        base = model(ids).logits
    lorakit.merge(model)
    merged = model(ids).logits
    lorakit.unmerge(model)
print(f"max |adapter - base|        = {(a - base).abs().max():.4f}")
print(f"max |0.5+0.5 mix - adapter| = {(mixed - a).abs().max():.2e}")
print(f"max |merged - unmerged|     = {(merged - mixed).abs().max():.2e}")
lorakit.delete_adapter(model, "other")
plain = lorakit.unload(model, merge=True)  # a plain transformers model with the adapter folded in
print(f"unloaded: {type(plain).__name__}; adapter files in {out / 'adapter'}")
