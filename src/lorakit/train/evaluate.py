"""Evaluation: token-weighted loss on held-out examples, and exact-match accuracy of greedy generations."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.control import merged
from lorakit.data.preference import Pair
from lorakit.data.tagging import decode_tags, entity_counts, f1_of
from lorakit.data.tokenize import IGNORE, Encoded, chat_messages
from lorakit.device import model_device, to_device
from lorakit.generate import format_prompt
from lorakit.inject import adapter_names
from lorakit.train.correlation import pearson, ranks
from lorakit.train.losses import feedback_stats, pair_stats
from lorakit.train.objectives import PreferenceObjective
from lorakit.train.schedule import collate


@torch.no_grad()
def eval_loss(model: nn.Module, rows: list[Encoded], pad_id: int, batch_size: int = 8) -> float | None:
    """Mean cross-entropy per learned token over `rows`; None when they hold no learned token (nothing to
    evaluate: a mean over nothing is not a loss of 0)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for i in range(0, len(rows), batch_size):
        batch = to_device(collate(rows[i : i + batch_size], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / count if count else None


def prompt_and_answer(
    ex: dict[str, Any], tokenizer=None, chat: bool = True
) -> tuple[str | list[dict[str, Any]], str, dict[str, Any]] | None:
    """What to prompt with, the expected answer and the chat template's extra arguments; None for plain-text
    examples, and for an answer that is a tool call a template renders itself (no text to compare). Tool calls,
    results and functions go through `lorakit.data.tokenize.chat_messages`, as in training."""
    if "prompt" in ex:
        return ex["prompt"], ex["completion"], {}
    if "messages" in ex:
        use_template = chat and bool(getattr(tokenizer, "chat_template", None))
        msgs, extra = (
            (ex["messages"], {}) if tokenizer is None else chat_messages(tokenizer, ex, use_template)
        )
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if msgs[last].get("tool_calls") or not isinstance(msgs[last].get("content"), str):
            return None
        return msgs[:last], msgs[last]["content"], extra
    return None


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer,
    examples: list[dict[str, Any]],
    *,
    max_new_tokens: int = 16,
    chat: bool = True,
    batch_size: int = 16,
    merge: bool = True,
    synced: bool = False,
) -> tuple[float | None, list[dict[str, str]]]:
    """Share of examples whose greedy answer equals the expected one (whitespace-stripped), and the samples.

    `merge`: fold the adapters into the base weights while decoding (faster; impossible on sharded weights).
    `synced`: every process of a sharded (FSDP) model runs this together; each keeps running forward passes
    until all are done (Hugging Face's `synced_gpus`), since a forward pass is a collective.
    """
    pairs = [p for p in (prompt_and_answer(ex, tokenizer, chat) for ex in examples) if p is not None]
    if not pairs:
        return None, []
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    samples = []
    try:
        # merged: faster decoding (unless the adapters cannot merge, e.g. a lora_bias on a layer without bias)
        with merged(model, or_unmerged=True) if merge and adapter_names(model) else nullcontext():
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                texts = [_prompt_text(tokenizer, p, chat, extra) for p, _, extra in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = to_device(dict(enc), model_device(model))
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                    **({"synced_gpus": True} if synced else {}),
                )
                for (_, want, _), row in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
                    got = tokenizer.decode(row, skip_special_tokens=True).strip()
                    samples.append({"expected": want.strip(), "got": got})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return sum(s["expected"] == s["got"] for s in samples) / len(samples), samples


def _prompt_text(tokenizer, prompt, chat: bool, extra: dict[str, Any]) -> str:
    if isinstance(prompt, str):
        return format_prompt(tokenizer, prompt, chat=chat)
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


@torch.no_grad()
def preference_eval(
    model: nn.Module, pairs: list[Pair], pad_id: int, objective: PreferenceObjective, batch_size: int = 8
):
    """The objective's preference loss (DPO, SimPO or ORPO; without an sft_weight's term) and the implicit
    rewards' accuracy and margin over `pairs`, in eval mode (no dropout); {} for no pairs. With KTO, `pairs` are
    its `Feedback` rows and the measures `feedback_eval`'s."""
    if not pairs:
        return {}
    if objective.rows == "feedback":
        return feedback_eval(model, pairs, pad_id, objective, batch_size)
    was_training = model.training
    model.eval()
    device = model_device(model)
    losses, chosen, rejected = [], [], []
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        batch = to_device({**collate(objective.encoded(part), pad_id), **objective.extras(part)}, device)
        loss, c, r, _, _ = objective.scores(model, batch)
        losses.append(loss)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    stats = pair_stats(torch.cat(chosen), torch.cat(rejected))
    return {
        "loss": float(torch.cat(losses).mean()),
        "reward_accuracy": stats["reward_accuracy"],
        "reward_margin": stats["reward_margin"],
    }


@torch.no_grad()
def feedback_eval(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int = 8
) -> dict[str, float]:
    """KTO's loss, the KL estimate and the rewards' accuracy and margin (`feedback_stats`) over feedback `rows`,
    in eval mode, in batches of `batch_size` (a last batch of one row joins the one before: its KL estimate
    needs another answer)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    starts = list(range(0, len(rows), batch_size))
    if len(starts) > 1 and len(rows) - starts[-1] == 1:
        starts.pop()
    losses, rewards, kls, desirable = [], [], [], []
    for i, start in enumerate(starts):
        part = rows[start : starts[i + 1] if i + 1 < len(starts) else len(rows)]
        batch = to_device({**collate(objective.encoded(part), pad_id), **objective.extras(part)}, device)
        loss, reward, kl, _, _ = objective.scores(model, batch)
        losses.append(loss)
        rewards.append(reward)
        kls.append(kl.expand(len(part)))
        desirable.append(batch["desirable"])
    model.train(was_training)
    stats = feedback_stats(torch.cat(rewards), torch.cat(kls), torch.cat(desirable), objective.beta)
    return {"loss": float(torch.cat(losses).mean()), **stats}


@torch.no_grad()
def classify_eval(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int = 16
) -> dict[str, float]:
    """A classifier's mean cross-entropy (unweighted, whatever the class weights), accuracy (the share of rows whose
    highest logit is their class) and balanced accuracy (the mean over the classes present of each one's accuracy,
    which a majority class cannot carry alone) over `Labelled` rows, in eval mode; {} for no rows."""
    if not rows:
        return {}
    if getattr(objective, "multi_label", False):
        return _multi_label_eval(model, rows, pad_id, objective, batch_size)
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = 0.0
    hits: dict[int, list[bool]] = {}
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = to_device({**collate(objective.encoded(part), pad_id), **objective.extras(part)}, device)
        logits = objective.logits(model, batch)
        target = batch["class_labels"]
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        for t, ok in zip(target.tolist(), (logits.argmax(-1) == target).tolist(), strict=True):
            hits.setdefault(t, []).append(ok)
    model.train(was_training)
    right = sum(sum(h) for h in hits.values())
    balanced = sum(sum(h) / len(h) for h in hits.values()) / len(hits)
    return {"loss": total / len(rows), "accuracy": right / len(rows), "balanced_accuracy": balanced}


def _multi_label_eval(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int
) -> dict[str, float]:
    """A multi-label classifier's mean binary cross-entropy (over rows and classes, transformers' loss), its
    accuracy (the share of rows whose every class is right: a class is predicted where its logit is over 0) and
    micro-F1 (over all the rows' classes: 2·TP / (2·TP + FP + FN); 1 where nothing is there to find or find)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, exact, tp, fp, fn = 0.0, 0, 0, 0, 0
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = to_device({**collate(objective.encoded(part), pad_id), **objective.extras(part)}, device)
        logits = objective.logits(model, batch)
        hot = batch["class_targets"].to(logits) > 0.5
        total += float(
            F.binary_cross_entropy_with_logits(logits, hot.float(), reduction="none").mean(-1).sum()
        )
        said = logits > 0
        exact += int((said == hot).all(-1).sum())
        tp += int((said & hot).sum())
        fp += int((said & ~hot).sum())
        fn += int((~said & hot).sum())
    model.train(was_training)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"loss": total / len(rows), "accuracy": exact / len(rows), "f1": f1}


def regression_eval(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int = 16
) -> dict[str, float]:
    """A regression's mean squared error (`loss`), Pearson's and Spearman's correlations of its predictions with
    the targets (GLUE's STS-B metrics; 0 where the predictions or the targets are all equal: nothing to
    correlate), over `Labelled` rows with numeric labels, in eval mode; {} for no rows."""
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    device = model_device(model)
    predicted: list[float] = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = to_device({**collate(objective.encoded(part), pad_id), **objective.extras(part)}, device)
        predicted += objective.logits(model, batch)[:, 0].tolist()
    model.train(was_training)
    p = torch.tensor(predicted, dtype=torch.float64)
    t = torch.tensor([float(r.label) for r in rows], dtype=torch.float64)
    return {
        "loss": float(((p - t) ** 2).mean()),
        "pearson": pearson(p, t),
        "spearman": pearson(ranks(p), ranks(t)),
    }


@torch.no_grad()
def tagged_predictions(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int = 16
) -> tuple[list[list[tuple[int, int, str]]], float, int, int]:
    """A token classifier's reading of `Tagged` rows, in eval mode: each row's predicted entity spans (its tokens'
    highest tag logits, `decode_tags`), and over all rows the summed cross-entropy of the tagged tokens, their
    number and how many got their tag right."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    names = objective.names
    spans, total, tokens, right = [], 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = to_device(collate(objective.encoded(part), pad_id), device)
        logits = objective.logits(model, batch)
        target = batch["labels"]
        tagged = target != IGNORE
        total += float(
            F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        )
        tokens += int(tagged.sum())
        said = logits.argmax(-1)
        right += int(((said == target) & tagged).sum())
        for r, tags in zip(part, said.tolist(), strict=True):
            spans.append(decode_tags(tags[: len(r.offsets)], r.offsets, names, r.text))
    model.train(was_training)
    return spans, total, tokens, right


def tagging_eval(
    model: nn.Module, rows: list, pad_id: int, objective, batch_size: int = 16
) -> dict[str, float]:
    """A token classifier's mean cross-entropy over the tagged tokens (`loss`), the share of those tokens tagged
    right (`accuracy`), and the entities' micro precision, recall and F1 (an entity found only when its start,
    end and type are all right, seqeval's strict count) over `Tagged` rows; {} for no rows."""
    if not rows:
        return {}
    return tagging_measures(rows, tagged_predictions(model, rows, pad_id, objective, batch_size))


def tagging_measures(rows: list, predicted: tuple) -> dict[str, float]:
    """`tagging_eval`'s measures from `tagged_predictions`' answer for the same rows."""
    spans, total, tokens, right = predicted
    tally = entity_tally(spans, rows)
    precision, recall, f1 = f1_of(*(tally[k].total() for k in ("tp", "fp", "fn")))
    return {
        "loss": total / max(tokens, 1),
        "accuracy": right / max(tokens, 1),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def entity_tally(spans: list[list[tuple[int, int, str]]], rows: list) -> dict[str, Counter]:
    """Per entity type, the entities found, found wrongly and missed (`entity_counts`) over `Tagged` rows and the
    spans predicted for each."""
    out: dict[str, Counter] = {"tp": Counter(), "fp": Counter(), "fn": Counter()}
    for said, r in zip(spans, rows, strict=True):
        for k, c in entity_counts(said, r.spans).items():
            out[k].update(c)
    return out
