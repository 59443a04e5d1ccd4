"""Random-weight checkpoints of real model shapes, for measuring cost at scale (never quality).

Writes a Hugging Face folder (config.json, bf16 safetensors shards with an index, the default model's tokenizer)
once into lorakit's cache and prints its path; a second call finds it there. Weights are ~N(0, 0.02), norms are
ones. No fp32 copy of the model ever exists: the skeleton is built on the meta device and each tensor is drawn
in bf16 just before its shard is written, so the peak is about one shard (2 GB).

    python benchmarks/random_checkpoint.py smollm2-1.7b        # 1.7B parameters, 3.4 GB
    python benchmarks/random_checkpoint.py llama2-7b           # 6.7B (Llama-2-7B's shape; SmolLM2's vocabulary)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "smollm2-1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=130000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # for tests of this script
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}
SHARD_BYTES = 2 << 30


def checkpoint(shape: str, cache_dir: str | None = None, seed: int = 0) -> Path:
    """The folder of random checkpoint `shape`, written first if it is not in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lorakit.envflags import cache_root
    from lorakit.models import SOURCE_FILE, resolve_model_dir

    out = cache_root(cache_dir) / "models" / f"random-{shape}"
    if (out / "config.json").is_file():
        return out
    tok_dir = resolve_model_dir(None)  # the default model's tokenizer, from the usual cache
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        **SHAPES[shape],
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-random-{shape}-", dir=out.parent))
    try:
        _write_shards(skeleton, tmp, seed)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"generated": f"random-{shape}", "by": "benchmarks/random_checkpoint.py", "seed": seed}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")  # `lorakit cache` keeps it
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_shards(skeleton: torch.nn.Module, folder: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    names, seen = [], set()
    for name, p in skeleton.named_parameters(remove_duplicate=True):  # a tied head is written once
        if id(p) in seen:
            continue
        seen.add(id(p))
        names.append((name, tuple(p.shape)))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(0.02)
            weight_map[name] = file
            total += 2 * tensors[name].numel()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        print(f"wrote {file}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--cache-dir", help="lorakit's cache (default: $LORAKIT_CACHE or ~/.cache/lorakit)")
    args = ap.parse_args(argv)
    print(checkpoint(args.shape, args.cache_dir))


if __name__ == "__main__":
    main()
