"""sentence-transformers as the oracle of lorakit's embedding models (test_embed, test_embed_scored): its own model
of a folder with PEFT's adapter, a few steps of one of its losses with torch's AdamW, the trained adapter as PEFT
keys it, and the tiny embedding model both start from."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model
from lorakit.task_types import mark_embedder

LR = 5e-3  # as seqcls_oracle.lorakit_steps trains lorakit's side (constant, AdamW, clip 1.0)


def tiny_embedder(model_dir: Path, out: Path):
    """The tiny model of `model_dir` loaded bare as an embedding model (last-token pooling), with LoRA r=4 on every
    linear layer and B drawn off zero (seed 4), saved to `out` as the peer's start: (model, tokenizer, adapter)."""
    torch.manual_seed(4)
    model, tok = load_model(str(model_dir), bare=True)
    mark_embedder(model, "last")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok, lorakit.save_adapter(model, out)


def st_model(folder, pooling: str, adapter: Path | None = None, trainable: bool = False):
    """sentence-transformers' own model of `folder`: its transformer (with PEFT's `adapter`), `pooling`
    (sentence-transformers' name), L2 normalization. Texts go in as they are (sentence-transformers 6 otherwise
    wraps a decoder's texts in its chat template)."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer, models

    tr = models.Transformer(str(folder))
    tr.modality_config.pop("message", None)
    if adapter is not None:
        tr.auto_model = PeftModel.from_pretrained(tr.auto_model, adapter, is_trainable=trainable)
    dim = tr.auto_model.config.hidden_size
    return SentenceTransformer(modules=[tr, models.Pooling(dim, pooling), models.Normalize()], device="cpu")


def st_train(peer, loss_fn, columns: list[list[str]], labels, steps: int = 3) -> list[float]:
    """`steps` steps of `loss_fn` on one batch of text `columns` (and `labels`) with torch's AdamW (lr LR, clip
    1.0): each step's loss."""
    params = [p for p in peer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    features = [peer.preprocess(texts) for texts in columns]
    peer.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(features, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def peft_adapter(peer) -> dict[str, torch.Tensor]:
    """The peer's trained adapter as lorakit keys a bare model's (PEFT keys it from the bare model, less its
    prefix)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peer[0].auto_model)
    return {k if k.startswith("base_model.model.") else f"base_model.model.{k}": v for k, v in state.items()}
