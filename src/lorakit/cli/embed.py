"""`lorakit eval` of an embedding model's adapter (task_type FEATURE_EXTRACTION): how well each anchor of a file of
text pairs (or the built-in task's held-out dates) finds its positive among all their positives and negatives:
accuracy (ranked first), recall@10, MRR@10, the contrastive loss; of a file of scored pairs, how well their cosine
similarities follow the scores (Pearson, Spearman, the CoSENT loss); with --compare-base, the base model's too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def embedding_adapter(args: argparse.Namespace) -> str | None:
    """The pooling of --adapter when it is an embedding model's adapter (FEATURE_EXTRACTION), else None;
    ConfigError where --objective embed names an adapter that is not one."""
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_pooling, read_config_json

    adapter = args.adapter
    is_dir = bool(adapter) and Path(adapter).is_dir()
    if is_dir and read_config_json(adapter).get("task_type") == "FEATURE_EXTRACTION":
        return adapter_pooling(adapter) or "auto"  # PEFT's own files do not say: the model's default
    if args.objective == "embed":
        raise ConfigError(
            "--objective embed measures an embedding model: give --adapter with one (task_type FEATURE_EXTRACTION, "
            "as lorakit train --objective embed saves it)"
        )
    return None


def eval_embedder(args: argparse.Namespace, pooling: str) -> int:
    """Measure the embedding model of --adapter on --data's text pairs (or the built-in task's held-out dates)."""
    import lorakit
    from lorakit.cli.common import load
    from lorakit.cli.reward import refuse_first
    from lorakit.data.tasks import make_text_pairs
    from lorakit.data.textpairs import read_text_pairs
    from lorakit.embeddings import default_pooling
    from lorakit.errors import ConfigError
    from lorakit.train.config import DataSection, EmbedSection
    from lorakit.train.embed_objective import embedding_measures, encode_text_pairs

    refuse_first([(args.beta is not None, "--beta: an embedding model has no beta")])
    if args.data:
        items, source = read_text_pairs(args.data, args.fields), str(args.data)
    else:  # the pairs a default `lorakit train --objective embed` holds out
        d = DataSection()
        if args.task.endswith("-scored"):  # 3 scored pairs per held-out date, as a run of data.n_eval --limit
            items = make_text_pairs(args.task, n_train=d.n_train, n_eval=args.limit)[1]
        else:
            items = make_text_pairs(args.task, n_train=d.n_train, n_eval=max(d.n_eval, args.limit))[1]
            items = items[: args.limit]
        source = f"built-in task {args.task!r}"
    model, tok = load(args.model, args.device, args.dtype, bare=True)
    if pooling == "auto":
        pooling = default_pooling(model)
    dims = sorted(set(args.dimensions or ()), reverse=True)
    width = model.get_input_embeddings().embedding_dim
    if dims and dims[0] >= width:
        raise ConfigError(f"--dimensions {dims[0]}: the model's vectors have {width} dimensions; give fewer")
    rows = encode_text_pairs(tok, items, args.max_len)
    scale = EmbedSection().scale
    report = {"objective": "embed", "examples": len(rows), "source": source, "pooling": pooling}
    if args.compare_base:
        report["base"] = embedding_measures(model, rows, tok.pad_token_id, pooling, scale, dims)
    lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    report["adapter"] = embedding_measures(model, rows, tok.pad_token_id, pooling, scale, dims)
    if args.json:
        print(json.dumps(report))
        return 0
    negatives = sum(r.negative is not None for r in rows)
    scored = bool(rows) and rows[0].score is not None
    kind = "scored for similarity" if scored else f"{negatives} with a hard negative"
    print(f"{len(rows)} pairs of {source} ({kind}), {pooling} pooling")
    for who in ("base", "adapter"):
        if who in report and scored:  # how the cosine similarities follow the scores
            m = report[who]
            print(f"{who:8} Pearson {m['pearson']:.4f}, Spearman {m['spearman']:.4f}, loss {m['loss']:.4f}")
            for d in dims:
                print(
                    f"{'':8} {d} dimensions: Pearson {m[f'dim{d}_pearson']:.4f}, Spearman {m[f'dim{d}_spearman']:.4f}"
                )
        elif who in report:
            m = report[who]
            print(
                f"{who:8} accuracy {100 * m['accuracy']:.1f}% (the positive ranked first), recall@10 "
                f"{100 * m['recall_at_10']:.1f}%, MRR@10 {m['mrr_at_10']:.4f}, loss {m['loss']:.4f}"
            )
            for d in dims:
                print(
                    f"{'':8} {d} dimensions: accuracy {100 * m[f'dim{d}_accuracy']:.1f}%, recall@10 "
                    f"{100 * m[f'dim{d}_recall_at_10']:.1f}%, MRR@10 {m[f'dim{d}_mrr_at_10']:.4f}"
                )
    return 0
