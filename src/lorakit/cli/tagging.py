"""`lorakit eval` of a token classifier's adapter (task_type TOKEN_CLS): on tagged texts, the entities' precision,
recall and F1 (overall and per type), the share of tokens tagged right, the cross-entropy, and the first texts
with the entities expected and found."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLES = 3
"""Texts whose entities the report shows."""


def tagger_adapter(args: argparse.Namespace) -> int | None:
    """The number of tags of --adapter's head when it is a token classifier's adapter (TOKEN_CLS), else None;
    ConfigError where --objective token_classify names an adapter that is not one."""
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_num_labels

    adapter = args.adapter
    tags = adapter_num_labels(adapter, task="TOKEN_CLS") if adapter and Path(adapter).is_dir() else None
    if args.objective == "token_classify" and tags is None:
        raise ConfigError(
            "--objective token_classify measures a token classifier: give --adapter with one (task_type "
            "TOKEN_CLS, as lorakit train --objective token_classify saves it)"
        )
    return tags


def eval_tagger(args: argparse.Namespace, tags: int) -> int:
    """Measure the token classifier of --adapter on --data's tagged texts (or the built-in task's held-out
    sentences)."""
    import lorakit
    from lorakit.cli.common import load
    from lorakit.cli.reward import refuse_first
    from lorakit.data.tagging import encode_tagged, entity_types, f1_of, read_tagged
    from lorakit.data.tasks import make_tagged
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_class_names
    from lorakit.train.config import DataSection, RunConfig, TrainSection
    from lorakit.train.evaluate import entity_tally, tagged_predictions, tagging_measures
    from lorakit.train.objectives import make_objective

    refuse_first(
        [
            (args.beta is not None, "--beta: a token classifier has no beta"),
            (
                args.compare_base,
                "--compare-base: a token classifier's base has no trained head to compare with (its head is the "
                "adapter's)",
            ),
        ]
    )
    names = adapter_class_names(args.adapter)
    if names is None or len(names) != tags or names[0] != "O":
        raise ConfigError(
            f"{args.adapter}: a token classifier's adapter needs its tag names (O, B-..., I-...) in its metadata, "
            f"as lorakit train saves them; its head has {tags} outputs"
        )
    if args.data:
        items, source = read_tagged(args.data, args.fields), str(args.data)
    else:  # the sentences a default `lorakit train --objective token_classify` holds out
        d = DataSection()
        items = make_tagged(args.task, n_train=d.n_train, n_eval=max(d.n_eval, args.limit))[1][: args.limit]
        source = f"built-in task {args.task!r}"
    model, tok = load(args.model, args.device, args.dtype, num_labels=tags, per_token=True)
    lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    rows, stats = encode_tagged(tok, items, names, max_len=args.max_len, source=source)
    objective = make_objective(RunConfig(train=TrainSection(objective="token_classify")))
    objective.num_labels, objective.names = tags, names
    predicted = tagged_predictions(model, rows, tok.pad_token_id, objective)  # one pass for all the measures
    measured = tagging_measures(rows, predicted) if rows else {}
    found = predicted[0]
    counts = entity_tally(found, rows)
    per_type = {}
    for kind in entity_types(names):
        p, r, f = f1_of(counts["tp"][kind], counts["fp"][kind], counts["fn"][kind])
        per_type[kind] = {
            "precision": p,
            "recall": r,
            "f1": f,
            "support": counts["tp"][kind] + counts["fn"][kind],
        }

    def shown(r, spans):
        return [[r.text[s:e], kind] for s, e, kind in spans]

    samples = [
        {"text": r.text, "expected": shown(r, r.spans), "predicted": shown(r, said)}
        for r, said in list(zip(rows, found, strict=True))[:SAMPLES]
    ]
    report = {
        "objective": "token_classify",
        "examples": len(rows),
        "truncated": stats["truncated"],
        "max_len": args.max_len,
        "tags": names,
        "adapter": {**measured, "per_type": per_type, "samples": samples},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{len(rows)} texts ({stats['truncated']} truncated to {args.max_len} tokens), "
        f"{sum(stats['entities'].values())} entities of {len(per_type)} types"
    )
    if not rows:
        print("nothing to measure")
        return 0
    print(
        f"entities: F1 {measured['f1']:.4f} (precision {measured['precision']:.4f}, recall {measured['recall']:.4f}); "
        f"tokens tagged right {100 * measured['accuracy']:.1f}%, cross-entropy {measured['loss']:.4f}"
    )
    print("per type: " + ", ".join(f"{k} F1 {v['f1']:.4f} ({v['support']})" for k, v in per_type.items()))
    for s in samples:
        print(f"  {s['text']!r}: expected {s['expected']}, found {s['predicted']}")
    return 0
