"""Built-in tasks: generated procedurally from a seed, with answers that can be checked by exact match.

`dates`: rewrite a date written in words ("the 5th of March, 2021", "Mar 5 2021", ...) as ISO 8601
("2021-03-05"). The base model knows month names but not this exact output, so it mostly fails; a LoRA learns the
mapping in a few hundred short steps.
"""

from __future__ import annotations

import calendar
import datetime
import random
import re
from typing import Any

MONTHS = list(calendar.month_name)[1:]
INSTRUCTION = "Rewrite this date in ISO format (YYYY-MM-DD), answer with the date only: "


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


FORMATS = [
    lambda d, m, y: f"{MONTHS[m - 1]} {d}, {y}",
    lambda d, m, y: f"{d} {MONTHS[m - 1]} {y}",
    lambda d, m, y: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda d, m, y: f"{MONTHS[m - 1][:3]} {d} {y}",
    lambda d, m, y: f"{MONTHS[m - 1]} {_ordinal(d)} {y}",
]


def dates_example(rng: random.Random) -> dict[str, Any]:
    y, m = rng.randint(1900, 2099), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    text = rng.choice(FORMATS)(d, m, y)
    return {"prompt": INSTRUCTION + text, "completion": f"{y:04d}-{m:02d}-{d:02d}"}


TASKS = {"dates": dates_example}


def make_task(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) example lists for built-in task `name`; eval prompts never occur in train."""
    if name not in TASKS:
        from lorakit.data.files import DataError

        raise DataError(f"unknown built-in task {name!r}; available: {sorted(TASKS)}")
    rng = random.Random(seed)
    gen = TASKS[name]
    eval_set: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(eval_set) < n_eval:
        ex = gen(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            eval_set.append(ex)
    train: list[dict[str, Any]] = []
    while len(train) < n_train:
        ex = gen(rng)
        if ex["prompt"] not in seen:
            train.append(ex)
    return train, eval_set


def wrong_date(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a `dates` example: the right date in another format (US, European, written out)
    or with day and month swapped, the mistakes a model makes."""
    y, m, d = (int(x) for x in answer.split("-"))
    options = [f"{m:02d}/{d:02d}/{y}", f"{d:02d}.{m:02d}.{y}", FORMATS[0](d, m, y)]
    if d <= 12 and d != m:
        options.append(f"{y:04d}-{d:02d}-{m:02d}")
    return rng.choice(options)


def make_pairs(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) preference records {"prompt", "chosen", "rejected"} for built-in task `name`: its examples,
    each answer chosen over a plausible wrong one (`wrong_date`)."""
    rng = random.Random(seed + 1)
    train, eval_set = make_task(name, n_train=n_train, n_eval=n_eval, seed=seed)
    return tuple(
        [
            {
                "prompt": ex["prompt"],
                "chosen": ex["completion"],
                "rejected": wrong_date(ex["completion"], rng),
            }
            for ex in part
        ]
        for part in (train, eval_set)
    )


# `dates` as text classification (train.objective classify): which way a date is written
WRITTEN = {
    "iso": lambda d, m, y: f"{y:04d}-{m:02d}-{d:02d}",
    "us": lambda d, m, y: f"{m:02d}/{d:02d}/{y}",
    "european": lambda d, m, y: f"{d:02d}.{m:02d}.{y}",
    "words": lambda d, m, y: FORMATS[(d + m + y) % len(FORMATS)](d, m, y),
}


def make_labelled(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) classification records {"text", "text_pair": None, "label"} for built-in task `name`: for
    `dates`, the task's dates each written one of four ways (ISO, US, European, in words), the label saying
    which; eval texts never occur in train."""
    train, eval_set = make_task(name, n_train=n_train, n_eval=n_eval, seed=seed)
    rng = random.Random(seed + 2)
    seen: set[str] = set()

    def labelled(part: list[dict[str, Any]], held_out: bool) -> list[dict[str, Any]]:
        out = []
        for ex in part:
            y, m, d = (int(x) for x in ex["completion"].split("-"))
            label = rng.choice(sorted(WRITTEN))
            text = WRITTEN[label](d, m, y)
            if held_out:
                seen.add(text)
            elif text in seen:
                continue
            out.append({"text": text, "text_pair": None, "label": label})
        return out

    held_out = labelled(eval_set, True)
    return labelled(train, False), held_out


def make_scored(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) regression records {"text", "text_pair": None, "label"} for built-in task `name`: for `dates`,
    `make_labelled`'s texts (a date written one of four ways), each labelled with its year as a number,
    (year - 2000) / 100, from -1 (1900) to 0.99 (2099)."""
    train, eval_set = make_labelled(name, n_train=n_train, n_eval=n_eval, seed=seed)
    return [_year(it) for it in train], [_year(it) for it in eval_set]


def _year(item: dict[str, Any]) -> dict[str, Any]:
    year = int(re.search(r"\b(1[89]|20)\d\d\b", item["text"]).group(0))
    return {"text": item["text"], "text_pair": None, "label": (year - 2000) / 100}


# `dates` as token classification (train.objective token_classify): find the dates in a sentence, numeric or in
# words
SENTENCES = [
    "The contract was signed on {} and renewed on {}.",
    "Anna was born {}, her brother {}.",
    "Please move the meeting from {} to {}.",
    "Shipped {}; delivered {}, two weeks late.",
    "The museum opened on {} and closed on {}.",
    "Our records say {} but the invoice says {}.",
    "Between {} and {} the shop was shut.",
    "He wrote {} on the form, then crossed it out and wrote {}.",
]


def make_tagged(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) token-classification records {"text", "spans"} for built-in task `name`: for `dates`, a
    sentence holding two of the task's dates, each written one of four ways (`make_labelled`'s: ISO, US,
    European, in words), each date an entity typed `numeric` (the first three) or `words`; eval texts never occur
    in train. (Not typed by the four ways: a causal LM tags each token seeing only what comes before it, and
    "02" begins a US date as it begins a European one.)"""
    train, eval_set = make_task(name, n_train=2 * n_train, n_eval=2 * n_eval, seed=seed)
    rng = random.Random(seed + 3)
    seen: set[str] = set()

    def tagged(part: list[dict[str, Any]], held_out: bool) -> list[dict[str, Any]]:
        out = []
        for first, second in zip(part[::2], part[1::2], strict=False):
            template, spans, pieces = rng.choice(SENTENCES), [], []
            for ex in (first, second):
                y, m, d = (int(x) for x in ex["completion"].split("-"))
                kind = rng.choice(sorted(WRITTEN))
                pieces.append((WRITTEN[kind](d, m, y), "words" if kind == "words" else "numeric"))
            head, middle, tail = template.split("{}")
            text = head + pieces[0][0] + middle + pieces[1][0] + tail
            spans = [(len(head), len(head) + len(pieces[0][0]), pieces[0][1])]
            at = spans[0][1] + len(middle)
            spans.append((at, at + len(pieces[1][0]), pieces[1][1]))
            if held_out:
                seen.add(text)
            elif text in seen:
                continue
            out.append({"text": text, "spans": spans})
        return out

    held_out = tagged(eval_set, True)
    return tagged(train, False), held_out


def make_text_pairs(name: str = "dates", *, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """(train, eval) embedding records {"anchor", "positive", "negative"} for built-in task `name`: for `dates`, a
    date in words (the task's prompt less its instruction) and the same date in ISO 8601, with a near miss in ISO
    as its hard negative (day and month swapped where both are <= 12, else the day after); eval anchors never occur
    in train. `dates-scored`: scored pairs {"anchor", "positive", "score"} instead, three per date: the same date
    (score 1), the near miss (0.5) and another date of the same set (0), `n_train` and `n_eval` dates each."""
    if name.endswith("-scored"):
        return tuple(
            _scored(part, seed)
            for part in make_text_pairs(name[: -len("-scored")], n_train=n_train, n_eval=n_eval, seed=seed)
        )
    train, eval_set = make_task(name, n_train=n_train, n_eval=n_eval, seed=seed)

    def pair(ex: dict[str, Any]) -> dict[str, Any]:
        y, m, d = (int(x) for x in ex["completion"].split("-"))
        if d <= 12 and d != m:
            near = f"{y:04d}-{d:02d}-{m:02d}"
        else:
            near = (datetime.date(y, m, d) + datetime.timedelta(days=1)).isoformat()
        return {
            "anchor": ex["prompt"].removeprefix(INSTRUCTION),
            "positive": ex["completion"],
            "negative": near,
        }

    return [pair(ex) for ex in train], [pair(ex) for ex in eval_set]


def _scored(pairs: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Each pair of `pairs` as three scored ones: its positive (1), its negative (0.5), another pair's positive
    (0)."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(pairs):
        other = pairs[(i + rng.randrange(1, len(pairs))) % len(pairs)]["positive"] if len(pairs) > 1 else None
        out.append({"anchor": p["anchor"], "positive": p["positive"], "negative": None, "score": 1.0})
        out.append({"anchor": p["anchor"], "positive": p["negative"], "negative": None, "score": 0.5})
        if other is not None and other != p["positive"]:
            out.append({"anchor": p["anchor"], "positive": other, "negative": None, "score": 0.0})
    return out
