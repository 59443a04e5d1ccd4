"""Run by test_fsdp.py, alone or under torchrun: `run_training` (the `lorakit train` path) on a tiny Llama with a
character-level tokenizer, FSDP2 on. Arguments: data folder, grad_accum, then one or more runs, one after the
other in this process: a run folder, or FOLDER=CHECKPOINT to resume from a checkpoint.

Everything a real run does happens here: sharding, eval before/during/after (generation included), periodic
checkpoints, resume, adapter save. Only the model and tokenizer are tiny stand-ins.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lorakit import LoraConfig  # noqa: E402
from lorakit.train.config import DataSection, EvalSection, RunConfig, TrainSection  # noqa: E402
from lorakit.train.distributed import finish_distributed  # noqa: E402
from lorakit.train.run import run_training  # noqa: E402

from tiny import tiny_llama  # noqa: E402


def char_tokenizer():
    """One token per printable ASCII character, plus <pad> (0) and </s> (1): 97 ids, within tiny_llama's 128."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as tk
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    backend = Tokenizer(tk.BPE(vocab=vocab, merges=[]))  # no merges: every character is a token
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def train(out: Path, data: Path, accum: int, resume: str | None) -> None:
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    cfg = RunConfig(
        lora=LoraConfig(r=4, alpha=8, targets="all-linear"),
        data=DataSection(
            train_file=str(data / "train.jsonl"), eval_file=str(data / "eval.jsonl"), chat=False, max_len=32
        ),
        train=TrainSection(
            out_dir=str(out),
            steps=4,
            batch_size=4,
            grad_accum=accum,
            lr=1e-2,
            warmup_steps=1,
            max_grad_norm=0.05,  # below the grad norms seen here (~0.4-0.6): clipping acts on every step
            eval_every=2,
            save_every=2,
            resume=resume,
            fsdp=True,
        ),
        eval=EvalSection(max_new_tokens=4, limit=4),
    )
    run_training(cfg, model=model, tokenizer=char_tokenizer())  # rank 0 writes summary.json


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in sys.argv[3:]:
        out, _, resume = spec.partition("=")
        train(Path(out), Path(sys.argv[1]), int(sys.argv[2]), resume or None)
    finish_distributed()
