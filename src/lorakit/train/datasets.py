"""A run's data: the data section's examples, preference pairs, feedback (KTO) or labelled texts (a classifier),
read, split and tokenized."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.data.feedback import Feedback, encode_feedback, read_feedback, unpaired
from lorakit.data.jsonl import DataError, read_examples
from lorakit.data.labels import (
    class_ids,
    class_names,
    encode_labelled,
    encode_targets,
    is_multi_label,
    read_labelled,
)
from lorakit.data.preference import Pair, as_pair, encode_pairs, read_pairs
from lorakit.data.tagging import encode_tagged, read_tagged, tag_names
from lorakit.data.tasks import make_labelled, make_pairs, make_scored, make_tagged, make_task, make_text_pairs
from lorakit.data.textpairs import read_text_pairs
from lorakit.data.tokenize import IGNORE, Encoded, encode_dataset, pack
from lorakit.errors import ConfigError
from lorakit.train.config import RunConfig
from lorakit.train.embed_objective import TextPair, encode_text_pairs
from lorakit.variants.alora import check_invocation

log = logging.getLogger(__name__)


def load_examples(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, description) from the data section: a built-in task, or data files."""
    return _load(cfg, read_examples, make_task)


def load_pairs(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, description) preference pairs ({"chosen": example, "rejected": example}) from the data
    section: a built-in task's answers each preferred to a plausible wrong one, or data files."""

    def task_pairs(name: str, **kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train, ev = make_pairs(name, **kw)
        return [as_pair(r, "explicit", name) for r in train], [as_pair(r, "explicit", name) for r in ev]

    return _load(cfg, read_pairs, task_pairs)


def load_feedback(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, description) feedback ({"example", "desirable"}) from the data section: a built-in task's
    preference pairs, each side on its own (the answer desirable, the plausible wrong one not), or data files
    (`lorakit.data.feedback`)."""

    def task_feedback(name: str, **kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train, ev = make_pairs(name, **kw)
        return tuple(unpaired([as_pair(r, "explicit", name) for r in part]) for part in (train, ev))

    return _load(cfg, read_feedback, task_feedback)


def _load(
    cfg: RunConfig, read: Callable, task: Callable
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    d = cfg.data
    if not d.train_file:
        train, ev = task(d.task, n_train=d.n_train, n_eval=d.n_eval, seed=cfg.train.seed)
        return train, ev, f"built-in task {d.task!r}"
    train = read(d.train_file, d.fields)
    if d.eval_file:
        return train, read(d.eval_file, d.fields), f"{d.train_file} (eval: {d.eval_file})"
    rng = random.Random(cfg.train.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_eval = max(1, int(len(train) * d.eval_split))
    if n_eval >= len(train):
        raise DataError(f"{d.train_file}: {len(train)} example(s) are too few to hold out an eval split")
    ev = [train[i] for i in order[:n_eval]]
    return [train[i] for i in order[n_eval:]], ev, f"{d.train_file} ({n_eval} held out for eval)"


@dataclass
class RunData:
    """A run's tokenized data."""

    train_rows: list[Encoded] | list[Pair] | list[Feedback]
    eval_rows: list[Encoded] | list[Pair] | list[Feedback]
    eval_examples: list[dict[str, Any]]
    """The eval examples as read (exact-match accuracy generates from their prompts; of pairs, the chosen
    sides)."""
    stats: dict[str, dict[str, Any]]
    """{"train": ..., "eval": ...}: encode_dataset's counts (truncated examples, ...)."""


def encode_examples(cfg: RunConfig, tokenizer, say) -> RunData:
    """The data section's examples, tokenized (and packed if data.pack); DataError if nothing is left to learn,
    a warning if nothing is left to evaluate."""
    d = cfg.data
    train_ex, eval_ex, source = load_examples(cfg)
    enc = dict(max_len=d.max_len, chat=d.chat, train_on_all=d.train_on_all)
    train_rows, stats = encode_dataset(tokenizer, train_ex, **enc)
    eval_rows, eval_stats = encode_dataset(tokenizer, eval_ex, **enc)
    if not train_rows:
        raise DataError(f"{source}: no example has anything to learn after truncation to {d.max_len} tokens")
    if not any(lab != IGNORE for r in eval_rows for lab in r.labels):
        log.warning(
            "%s: no eval example has a token left to evaluate after truncation to %d tokens (%d of %d examples "
            "truncated): eval loss is not measured; raise data.max_len or shorten the eval prompts",
            source,
            d.max_len,
            eval_stats["truncated"],
            len(eval_ex),
        )
    invocation = cfg.lora.alora_invocation_tokens
    if invocation is not None:
        check_invocation(invocation, train_rows, tokenizer, source, say)
    if d.pack:
        train_rows = pack(train_rows, d.max_len)
    say(
        f"data: {source}: {len(train_rows)} train rows, {len(eval_rows)} eval; "
        f"{stats['truncated']} train / {eval_stats['truncated']} eval examples truncated to {d.max_len} tokens"
    )
    return RunData(train_rows, eval_rows, eval_ex, {"train": stats, "eval": eval_stats})


def encode_preferences(cfg: RunConfig, tokenizer, say) -> RunData:
    """The data section's preference pairs, tokenized; DataError if no pair is left to learn from."""
    d = cfg.data
    train_p, eval_p, source = load_pairs(cfg)
    train_rows, stats = encode_pairs(tokenizer, train_p, max_len=d.max_len, chat=d.chat)
    eval_rows, eval_stats = encode_pairs(tokenizer, eval_p, max_len=d.max_len, chat=d.chat)
    if not train_rows:
        raise DataError(
            f"{source}: no pair is left to learn from ({stats['dropped']} of {len(train_p)} dropped: an answer "
            f"truncated away at data.max_len {d.max_len}, or both answers the same)"
        )
    say(
        f"data: {source}: {len(train_rows)} train pairs, {len(eval_rows)} eval; {stats['truncated']} train / "
        f"{eval_stats['truncated']} eval pairs truncated to {d.max_len} tokens, {stats['dropped']} train / "
        f"{eval_stats['dropped']} eval dropped"
    )
    return RunData(train_rows, eval_rows, [p["chosen"] for p in eval_p], {"train": stats, "eval": eval_stats})


def encode_feedback_data(cfg: RunConfig, tokenizer, say) -> RunData:
    """The data section's feedback, tokenized (exact match generates from the desirable eval answers' prompts);
    DataError if no answer is left to learn from. Warns where the desirable and undesirable answers' weighted
    counts are out of the KTO paper's balance."""
    d = cfg.data
    train_f, eval_f, source = load_feedback(cfg)
    train_rows, stats = encode_feedback(tokenizer, train_f, max_len=d.max_len, chat=d.chat)
    eval_rows, eval_stats = encode_feedback(tokenizer, eval_f, max_len=d.max_len, chat=d.chat)
    if not train_rows:
        raise DataError(
            f"{source}: no answer is left to learn from ({stats['dropped']} of {len(train_f)} dropped: truncated "
            f"away at data.max_len {d.max_len})"
        )
    say(
        f"data: {source}: {len(train_rows)} train answers ({stats['desirable']} desirable, {stats['undesirable']} "
        f"undesirable), {len(eval_rows)} eval; {stats['truncated']} train / {eval_stats['truncated']} eval "
        f"truncated to {d.max_len} tokens, {stats['dropped']} train / {eval_stats['dropped']} eval dropped"
    )
    advice = kto_balance(
        stats["desirable"], stats["undesirable"], cfg.kto.desirable_weight, cfg.kto.undesirable_weight
    )
    if advice:
        log.warning(advice)
    wanted = [f["example"] for f in eval_f if f["desirable"]]
    return RunData(train_rows, eval_rows, wanted, {"train": stats, "eval": eval_stats})


def kto_balance(desirable: int, undesirable: int, w_d: float, w_u: float) -> str | None:
    """Advice when the desirable side's weighted count is not 1 to 4/3 times the undesirable side's (the KTO
    paper's eq. 8, as TRL checks it), else None."""
    if not desirable or not undesirable:
        side = "desirable" if not desirable else "undesirable"
        return f"KTO: the train data has no {side} answer; the loss then only pushes the other side"
    ratio = (desirable * w_d) / (undesirable * w_u)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    low, high = undesirable * w_u / desirable, undesirable * w_u / desirable * 4 / 3
    return (
        f"KTO: {desirable} desirable x weight {w_d:g} against {undesirable} undesirable x weight {w_u:g} is a "
        f"ratio of {ratio:.2f}; the KTO paper advises 1 to 4/3: set kto.desirable_weight in [{low:.2f}, {high:.2f}]"
    )


@dataclass
class Classes:
    """A classifier's data as read: train and eval items, where they came from, and the class names by id."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    source: str
    names: list[str]
    multi_label: bool = False
    """Each example's label is a list of classes (several per text)."""


def load_classes(cfg: RunConfig) -> Classes:
    """The data section's classification examples (`lorakit.data.labels`; the built-in task's dates, each labelled
    by how it is written) and the train data's classes. Read before the model, whose head has one output per
    class. DataError where the eval labels are lists and the train labels not, or the other way round."""
    train, ev, source = _load(cfg, read_labelled, make_labelled)
    names = class_names(train, source)
    multi = is_multi_label(train, source)
    if ev and is_multi_label(ev, f"{source}, eval") != multi:
        kinds = ("lists of classes", "single classes")
        raise DataError(
            f"{source}: the train labels are {kinds[not multi]} but the eval labels are {kinds[multi]}"
        )
    return Classes(train, ev, source, names, multi)


def class_weights(cfg: RunConfig, classes: Classes) -> list[float] | None:
    """Each class's weight in the loss (`classify.class_weights`), by class id; None: all 1. Of multi-label data,
    the weight of each class's positive examples (BCEWithLogitsLoss's pos_weight; balanced: the class's negatives
    over its positives). A named class the train data lacks is a ConfigError naming it and the classes."""
    weights = cfg.classify.class_weights
    if weights == "none":
        return None
    ids = class_ids(classes.train, classes.names, classes.source)
    n, k = len(classes.train), len(classes.names)
    if weights == "balanced" and classes.multi_label:
        counts = Counter(c for row in ids for c in row)
        return [(n - counts[c]) / counts[c] if counts[c] else 1.0 for c in range(k)]
    if weights == "balanced":
        counts = Counter(ids)
        return [n / (k * counts[c]) for c in range(k)]
    unknown = [c for c in weights if c not in classes.names]
    if unknown:
        raise ConfigError(
            f"classify.class_weights names {unknown[0]!r}, which is no class of {classes.source} "
            f"(classes: {', '.join(classes.names[:12])})"
        )
    return [float(weights.get(c, 1.0)) for c in classes.names]


def encode_classes(cfg: RunConfig, tokenizer, say, classes: Classes) -> RunData:
    """The classification examples, tokenized; an eval label the train data lacks is a DataError naming it."""
    d = cfg.data
    enc = dict(max_len=d.max_len)
    train_rows, stats = encode_labelled(tokenizer, classes.train, classes.names, **enc, source=classes.source)
    eval_rows, eval_stats = encode_labelled(
        tokenizer, classes.eval, classes.names, **enc, source=f"{classes.source}, eval"
    )
    counts = [0] * len(classes.names)
    for r in train_rows:
        for c in r.label if classes.multi_label else [r.label]:
            counts[c] += 1
    stats["per_class"] = dict(zip(classes.names, counts, strict=True))
    shown = ", ".join(f"{n} {c}" for n, c in list(stats["per_class"].items())[:8])
    more = f", ... ({len(classes.names)} in all)" if len(classes.names) > 8 else ""
    say(
        f"data: {classes.source}: {len(train_rows)} train examples ({shown}{more}), {len(eval_rows)} eval; "
        f"{stats['truncated']} train / {eval_stats['truncated']} eval truncated to {d.max_len} tokens"
    )
    return RunData(train_rows, eval_rows, [], {"train": stats, "eval": eval_stats})


def load_scored(cfg: RunConfig) -> Classes:
    """The data section's regression examples (`lorakit.data.labels`, each label a number; the built-in task's
    dates, each labelled with its year), as `Classes` with no class names. DataError where every train target is
    the same: there is nothing to learn."""
    train, ev, source = _load(cfg, lambda path, fields: read_labelled(path, fields, scores=True), make_scored)
    if len({it["label"] for it in train}) < 2:
        raise DataError(
            f"{source}: every example has the label {train[0]['label']!r}; a regression needs two values"
        )
    return Classes(train, ev, source, [])


def encode_scored(cfg: RunConfig, tokenizer, say, scored: Classes) -> RunData:
    """The regression examples, tokenized as a classifier's are."""
    d = cfg.data

    def encode(items: list[dict[str, Any]]) -> tuple[list, dict[str, Any]]:
        return encode_targets(tokenizer, items, [it["label"] for it in items], max_len=d.max_len)

    (train_rows, stats), (eval_rows, eval_stats) = encode(scored.train), encode(scored.eval)
    targets = [r.label for r in train_rows]
    stats["targets"] = {"min": min(targets), "max": max(targets), "mean": sum(targets) / len(targets)}
    say(
        f"data: {scored.source}: {len(train_rows)} train examples (targets {min(targets):.4g} to "
        f"{max(targets):.4g}, mean {stats['targets']['mean']:.4g}), {len(eval_rows)} eval; {stats['truncated']} "
        f"train / {eval_stats['truncated']} eval truncated to {d.max_len} tokens"
    )
    return RunData(train_rows, eval_rows, [], {"train": stats, "eval": eval_stats})


def load_tagged(cfg: RunConfig) -> Classes:
    """The data section's token-classification examples (`lorakit.data.tagging`: words and their tags, or texts
    and their entities' spans; the built-in task's sentences, each date an entity typed by how it is written), as
    `Classes` whose names are the model's tags ("O", then "B-" and "I-" of each entity type). Read before the
    model, whose head has one output per tag."""
    train, ev, source = _load(cfg, read_tagged, make_tagged)
    return Classes(train, ev, source, tag_names(train, source))


def encode_tagged_data(cfg: RunConfig, tokenizer, say, tagged: Classes) -> RunData:
    """The token-classification examples, tokenized with each token's tag; an eval entity type the train data
    lacks is a DataError naming it."""
    d = cfg.data
    train_rows, stats = encode_tagged(
        tokenizer, tagged.train, tagged.names, max_len=d.max_len, source=tagged.source
    )
    eval_rows, eval_stats = encode_tagged(
        tokenizer, tagged.eval, tagged.names, max_len=d.max_len, source=f"{tagged.source}, eval"
    )
    shown = ", ".join(f"{n} {k}" for k, n in list(stats["entities"].items())[:8])
    more = f", ... ({len(stats['entities'])} types in all)" if len(stats["entities"]) > 8 else ""
    say(
        f"data: {tagged.source}: {len(train_rows)} train examples ({sum(stats['entities'].values())} entities: "
        f"{shown}{more}), {len(eval_rows)} eval; {stats['truncated']} train / {eval_stats['truncated']} eval "
        f"truncated to {d.max_len} tokens"
    )
    return RunData(train_rows, eval_rows, [], {"train": stats, "eval": eval_stats})


def tag_weights(cfg: RunConfig, data: RunData, names: list[str]) -> list[float] | None:
    """Each tag's weight in a token classifier's loss (`classify.class_weights`), by tag id; None: all 1.
    balanced: n / (tags x the tag's count), over the train rows' tagged tokens and the tags that occur there (a
    tag that never occurs weighs 1); or {tag or entity type: weight}, an entity type weighing its B- and I- tags.
    A name that is neither is a ConfigError naming it and the tags."""
    weights = cfg.classify.class_weights
    if weights == "none":
        return None
    if weights == "balanced":
        counts = Counter(t for r in data.train_rows for t in r.row.labels if t != IGNORE)
        n, k = sum(counts.values()), len(counts)
        return [n / (k * counts[t]) if counts[t] else 1.0 for t in range(len(names))]
    by_tag: dict[str, float] = {}
    for key, w in weights.items():  # an entity type weighs its B- and I- tags
        tags = [key] if key in names else [t for t in (f"B-{key}", f"I-{key}") if t in names]
        if not tags:
            raise ConfigError(
                f"classify.class_weights names {key!r}, which is no tag or entity type of the token classifier "
                f"(tags: {', '.join(names[:12])})"
            )
        by_tag.update(dict.fromkeys(tags, float(w)))
    return [by_tag.get(t, 1.0) for t in names]


def head_data(cfg: RunConfig, objective) -> Classes | None:
    """The data of an objective that trains a head (classify, regression, token_classify), read before the model,
    whose head's size it sets on `objective` (with a classifier's class weights and whether it is multi-label, a
    token classifier's tag names); None for any other objective. ConfigError where train.best_metric does not fit
    the labels (balanced_accuracy of several classes per text, f1 of one)."""
    if objective.rows == "tagged":
        tagged = load_tagged(cfg)
        objective.num_labels, objective.names = len(tagged.names), tagged.names
        return tagged
    if objective.rows != "labelled":
        return None
    if objective.name == "regression":
        return load_scored(cfg)
    classes = load_classes(cfg)
    objective.num_labels = len(classes.names)
    objective.class_weights = class_weights(cfg, classes)
    objective.multi_label = classes.multi_label
    if classes.multi_label and cfg.train.best_metric == "balanced_accuracy":
        raise ConfigError(
            f"train.best_metric balanced_accuracy is a single-label classifier's; {classes.source} has several "
            "classes per text: use accuracy (every class right), loss, or f1"
        )
    if not classes.multi_label and cfg.train.best_metric == "f1":
        raise ConfigError(
            f"train.best_metric f1 is a multi-label classifier's; {classes.source} has one class per text: use "
            "accuracy, balanced_accuracy or loss"
        )
    return classes


def encode_head_data(cfg: RunConfig, tokenizer, say, objective, classes: Classes) -> RunData:
    """`head_data`'s examples, tokenized for the objective (a token classifier's class weights, which count its
    tagged tokens, set on it)."""
    if objective.rows == "tagged":
        data = encode_tagged_data(cfg, tokenizer, say, classes)
        objective.class_weights = tag_weights(cfg, data, classes.names)
        return data
    encode = encode_scored if objective.name == "regression" else encode_classes
    return encode(cfg, tokenizer, say, classes)


def encode_text_pair_data(cfg: RunConfig, tokenizer, say) -> RunData:
    """An embedding model's examples (`lorakit.data.textpairs`; the built-in task's dates in words and in ISO),
    each text tokenized as the tokenizer does by itself (`lorakit.embeddings.encode_texts`) and cut to
    data.max_len tokens."""
    d = cfg.data
    train, ev, source = _load(cfg, read_text_pairs, make_text_pairs)

    def encode(items: list[dict[str, Any]]) -> tuple[list[TextPair], dict[str, Any]]:
        rows = encode_text_pairs(tokenizer, items, d.max_len)
        negatives = sum(r.negative is not None for r in rows)
        return rows, {
            "examples": len(rows),
            "negatives": negatives,
            "truncated": sum(r.truncated for r in rows),
        }

    (train_rows, stats), (eval_rows, eval_stats) = encode(train), encode(ev)
    scored = _scored_checks(cfg, train, ev, source)
    say(
        f"data: {source}: {len(train_rows)} train pairs "
        + (
            "(scored for similarity: CoSENT), "
            if scored
            else f"({stats['negatives']} with a hard negative), "
        )
        + f"{len(eval_rows)} eval; {stats['truncated']} train / {eval_stats['truncated']} eval truncated to "
        f"{d.max_len} tokens"
    )
    return RunData(train_rows, eval_rows, [], {"train": stats, "eval": eval_stats})


def _scored_checks(cfg: RunConfig, train: list[dict], ev: list[dict], source: str) -> bool:
    """Whether the data are scored pairs (CoSENT); ConfigError for what does not go with the data's kind: a train
    and an eval file of different kinds, and settings of the in-batch contrastive loss (embed.symmetric,
    embed.gather, train.best_metric accuracy) with scored pairs, train.best_metric pearson without."""
    scored = bool(train) and "score" in train[0]
    if ev and ("score" in ev[0]) != scored:
        raise ConfigError(
            f"{source}: the train pairs are {'' if scored else 'not '}scored for similarity and the eval pairs "
            f"are {'not ' if scored else ''}; give both files of one kind"
        )
    e, best = cfg.embed, cfg.train.best_metric
    problems = [
        (scored and e.symmetric, "embed.symmetric"),
        (scored and e.gather, "embed.gather"),
        (scored and best == "accuracy", "train.best_metric accuracy"),
    ]
    for wrong, setting in problems:
        if wrong:
            raise ConfigError(
                f"{setting} belongs to the in-batch contrastive loss of pairs that belong together; {source} has "
                "scored pairs (CoSENT), measured by Pearson and Spearman (train.best_metric pearson or loss)"
            )
    if not scored and best == "pearson":
        raise ConfigError(
            f"train.best_metric pearson measures scored pairs; {source} has pairs that belong together (use "
            "accuracy or loss)"
        )
    return scored
