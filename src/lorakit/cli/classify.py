"""`lorakit eval` of a text classifier's adapter (task_type SEQ_CLS, two outputs or more): on labelled texts, its
accuracy, cross-entropy and the accuracy of each class, and the first predictions; and of a regression's (one
output, its metadata saying regression): on texts labelled with numbers, its squared error and correlations."""

from __future__ import annotations

import argparse
import json

SAMPLES = 3
"""Examples whose prediction the report shows."""


def eval_classifier(args: argparse.Namespace, labels: int) -> int:
    """Measure the classifier of --adapter on --data's labelled texts (or the built-in task's held-out ones)."""
    import torch

    import lorakit
    from lorakit.cli.common import load
    from lorakit.cli.reward import refuse_first
    from lorakit.data.labels import encode_labelled, read_labelled
    from lorakit.data.tasks import make_labelled
    from lorakit.device import model_device, to_device
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_class_names, adapter_problem
    from lorakit.train.config import DataSection, RunConfig, TrainSection
    from lorakit.train.evaluate import classify_eval
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    problems = [
        (
            args.objective not in (None, "classify"),
            f"{args.adapter} is a classifier's adapter: measure it with --objective classify (or none), not "
            f"{args.objective}",
        ),
        (args.beta is not None, "--beta: a classifier has no beta"),
        (
            args.compare_base,
            "--compare-base: a classifier's base has no trained head to compare with (its head is the adapter's)",
        ),
    ]
    refuse_first(problems)
    names = adapter_class_names(args.adapter) or [str(i) for i in range(labels)]
    if len(names) != labels:
        raise ConfigError(f"{args.adapter}: its head has {labels} outputs but it names {len(names)} classes")
    if args.data:
        items, source = read_labelled(args.data, args.fields), str(args.data)
    else:  # the texts a default `lorakit train --objective classify` holds out
        d = DataSection()
        items = make_labelled(args.task, n_train=d.n_train, n_eval=max(d.n_eval, args.limit))[1][: args.limit]
        source = f"built-in task {args.task!r}"
    model, tok = load(args.model, args.device, args.dtype, num_labels=labels)
    lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    multi = adapter_problem(args.adapter) == "multi_label_classification"
    if items and isinstance(items[0]["label"], list) != multi:
        kinds = ("lists of classes (several per text)", "single classes")
        raise ConfigError(
            f"{source}: its labels are {kinds[not isinstance(items[0]['label'], list)]}, but {args.adapter} is a "
            f"classifier of {kinds[not multi]}"
        )
    rows, stats = encode_labelled(tok, items, names, max_len=args.max_len, source=source)
    objective = make_objective(RunConfig(train=TrainSection(objective="classify")))
    objective.num_labels, objective.multi_label = labels, multi
    measured = classify_eval(model, rows, tok.pad_token_id, objective)
    per_class: dict[str, float] = {}
    samples = []
    if rows:
        model.eval()
        logits = []
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                part = rows[i : i + 16]
                batch = to_device(collate(objective.encoded(part), tok.pad_token_id), model_device(model))
                logits.append(objective.logits(model, batch).cpu())
        every = torch.cat(logits)
        if multi:  # a class is said where its logit is over 0; its accuracy: rows whose yes or no is right
            said = [set(torch.nonzero(row > 0).flatten().tolist()) for row in every]
            for c, name in enumerate(names):
                per_class[name] = sum(
                    (c in s) == (c in r.label) for s, r in zip(said, rows, strict=True)
                ) / len(rows)
            samples = [
                {
                    "text": it["text"],
                    "expected": [names[c] for c in r.label],
                    "predicted": [names[c] for c in sorted(s)],
                }
                for it, r, s in list(zip(items, rows, said, strict=True))[:SAMPLES]
            ]
        else:
            predicted = every.argmax(-1).tolist()
            for c, name in enumerate(names):
                mine = [p == c for p, r in zip(predicted, rows, strict=True) if r.label == c]
                if mine:
                    per_class[name] = sum(mine) / len(mine)
            samples = [
                {"text": it["text"], "expected": names[r.label], "predicted": names[p]}
                for it, r, p in list(zip(items, rows, predicted, strict=True))[:SAMPLES]
            ]
    report = {
        "objective": "classify",
        "multi_label": multi,
        "examples": len(rows),
        "truncated": stats["truncated"],
        "max_len": args.max_len,
        "classes": names,
        "adapter": {**measured, "per_class_accuracy": per_class, "samples": samples},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{len(rows)} examples ({stats['truncated']} truncated to {args.max_len} tokens), {len(names)} classes"
    )
    if not rows:
        print("nothing to measure")
        return 0
    if multi:
        print(
            f"accuracy (every class right): {100 * measured['accuracy']:.1f}%, micro-F1 {measured['f1']:.4f}, "
            f"binary cross-entropy {measured['loss']:.4f}"
        )
    else:
        print(
            f"accuracy: {100 * measured['accuracy']:.1f}% (balanced: {100 * measured['balanced_accuracy']:.1f}%), "
            f"cross-entropy {measured['loss']:.4f}"
        )
    print("per class: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in per_class.items()))
    for s in samples:
        print(f"  {s['text']!r}: expected {s['expected']}, predicted {s['predicted']}")
    return 0


def eval_regression(args: argparse.Namespace) -> int:
    """Measure the regression of --adapter on --data's texts labelled with numbers (or the built-in task's
    held-out ones)."""
    import torch

    import lorakit
    from lorakit.cli.common import load
    from lorakit.cli.reward import refuse_first
    from lorakit.data.labels import encode_targets, read_labelled
    from lorakit.data.tasks import make_scored
    from lorakit.device import model_device, to_device
    from lorakit.train.config import DataSection, RunConfig, TrainSection
    from lorakit.train.evaluate import regression_eval
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    refuse_first(
        [
            (
                args.objective not in (None, "regression"),
                f"{args.adapter} is a regression's adapter: measure it with --objective regression (or none), "
                f"not {args.objective}",
            ),
            (args.beta is not None, "--beta: a regression has no beta"),
            (args.compare_base, "--compare-base: a regression's base has no trained head to compare with"),
        ]
    )
    if args.data:
        items = read_labelled(args.data, args.fields, scores=True)
    else:  # the texts a default `lorakit train --objective regression` holds out
        d = DataSection()
        items = make_scored(args.task, n_train=d.n_train, n_eval=max(d.n_eval, args.limit))[1][: args.limit]
    model, tok = load(args.model, args.device, args.dtype, num_labels=1)
    lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    rows, stats = encode_targets(tok, items, [it["label"] for it in items], max_len=args.max_len)
    objective = make_objective(RunConfig(train=TrainSection(objective="regression")))
    measured = regression_eval(model, rows, tok.pad_token_id, objective)
    samples = []
    if rows:
        batch = to_device(collate(objective.encoded(rows[:SAMPLES]), tok.pad_token_id), model_device(model))
        with torch.no_grad():
            predicted = objective.logits(model.eval(), batch)[:, 0].tolist()
        samples = [
            {"text": it["text"], "expected": it["label"], "predicted": p}
            for it, p in zip(items[:SAMPLES], predicted, strict=True)
        ]
    report = {
        "objective": "regression",
        "examples": len(rows),
        "truncated": stats["truncated"],
        "max_len": args.max_len,
        "adapter": {**measured, "samples": samples},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{len(rows)} examples ({stats['truncated']} truncated to {args.max_len} tokens)")
    print(
        f"mean squared error {measured['loss']:.4f}, Pearson {measured['pearson']:.4f}, Spearman "
        f"{measured['spearman']:.4f}"
    )
    for s in samples:
        print(f"  {s['text']!r}: expected {s['expected']:.4g}, predicted {s['predicted']:.4g}")
    return 0
