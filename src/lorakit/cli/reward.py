"""`lorakit eval` of a sequence classifier's adapter (task_type SEQ_CLS). A reward model's (one output): on
preference pairs, how often its reward ranks the chosen answer above the rejected one, by how much, and the
pairwise loss it trained on. A text classifier's (`lorakit.cli.classify`): its accuracy on labelled texts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLES = 3
"""Pairs whose two rewards the report shows."""


def classifier_adapter(args: argparse.Namespace) -> int | None:
    """The number of outputs of --adapter's head when it is a sequence classifier's adapter (SEQ_CLS: a reward
    model and a regression have 1), else None; ConfigError where --objective reward, classify or regression names
    an adapter that is not one."""
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_num_labels, adapter_problem

    labels = adapter_num_labels(args.adapter) if args.adapter and Path(args.adapter).is_dir() else None
    regression = labels == 1 and adapter_problem(args.adapter) == "regression"
    wanted = {
        "reward": (labels == 1 and not regression, "a reward model"),
        "classify": (bool(labels and labels > 1), "a classifier"),
        "regression": (regression, "a regression"),
    }
    ok, what = wanted.get(args.objective, (True, ""))
    if not ok:
        raise ConfigError(
            f"--objective {args.objective} measures {what}: give --adapter with one (task_type SEQ_CLS, as "
            f"lorakit train --objective {args.objective} saves it)"
        )
    return labels


def refuse_first(problems: list[tuple[bool, str]]) -> None:
    """ConfigError with the message of the first (bad, message) whose bad is true."""
    from lorakit.errors import ConfigError

    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def eval_reward(args: argparse.Namespace, labels: int) -> int:
    """Measure the reward model of --adapter on --data's pairs (or the built-in task's held-out pairs)."""
    import torch

    import lorakit
    from lorakit.cli.common import load
    from lorakit.data.preference import as_pair, encode_pairs, read_pairs
    from lorakit.data.tasks import make_pairs
    from lorakit.device import model_device, to_device
    from lorakit.train.config import DataSection, RunConfig, TrainSection
    from lorakit.train.evaluate import preference_eval
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    problems = [
        (labels != 1, f"{args.adapter}: a sequence classifier with {labels} outputs, not a reward model (1)"),
        (
            args.objective not in (None, "reward"),
            f"{args.adapter} is a reward model's adapter: measure it with --objective reward (or none), not "
            f"{args.objective}",
        ),
        (args.beta is not None, "--beta: a reward model's rewards are its head's outputs, with no beta"),
        (
            args.compare_base,
            "--compare-base: a reward model's base has no trained head to compare with (its head is the adapter's)",
        ),
    ]
    refuse_first(problems)
    if args.data:
        pairs = read_pairs(args.data, args.fields)
    else:  # the pairs a default `lorakit train` holds out (each rejected answer drawn after the train pairs')
        d = DataSection()
        held_out = make_pairs(args.task, n_train=d.n_train, n_eval=max(d.n_eval, args.limit))[1]
        pairs = [as_pair(r, "explicit", args.task) for r in held_out[: args.limit]]
    model, tok = load(args.model, args.device, args.dtype, num_labels=labels)
    lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    rows, stats = encode_pairs(tok, pairs, max_len=args.max_len, chat=not args.no_chat)
    objective = make_objective(RunConfig(train=TrainSection(objective="reward")))
    measured = preference_eval(model, rows, tok.pad_token_id, objective)
    samples = []
    if rows:
        batch = to_device(collate(objective.encoded(rows[:SAMPLES]), tok.pad_token_id), model_device(model))
        with torch.no_grad():
            chosen, rejected = objective.rewards(model.eval(), batch).split(len(rows[:SAMPLES]))
        samples = [{"chosen": float(c), "rejected": float(r)} for c, r in zip(chosen, rejected, strict=True)]
    report = {
        "objective": "reward",
        "pairs": len(rows),
        "truncated": stats["truncated"],
        "dropped": stats["dropped"],
        "max_len": args.max_len,
        "adapter": {**measured, "samples": samples},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{len(rows)} preference pairs ({stats['truncated']} truncated to {args.max_len} tokens, "
        f"{stats['dropped']} dropped)"
    )
    if not rows:
        print("nothing to measure")
        return 0
    print(
        f"reward accuracy: {100 * measured['reward_accuracy']:.1f}% (margin {measured['reward_margin']:.3f}), "
        f"reward-model loss {measured['loss']:.4f}"
    )
    for s in samples:
        print(f"  chosen {s['chosen']:+.3f}, rejected {s['rejected']:+.3f}")
    return 0
