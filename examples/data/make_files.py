"""Write the built-in "dates" task as the data files of other tools, for `lorakit train --data.train_file`:

- dates_alpaca.json     Alpaca records in a JSON array (LLaMA-Factory's and Stanford Alpaca's layout)
- dates_sharegpt.jsonl  ShareGPT conversations, with a system prompt, one per line
- dates.csv             a spreadsheet with its own column names (question, answer): --data.fields renames them
- dates_rated.jsonl     answers rated one at a time for KTO (TRL's {"prompt", "completion", "label"}): every other
                        example's answer is replaced by a plausible wrong one and rated false; no prompt has both
- reviews_train.jsonl,  short reviews labelled positive or negative, for a text classifier (`--objective
  reviews_eval.jsonl    classify`): examples/classify.py's, the eval file's sentiment words never in the train file's
- reviews_imbalanced.jsonl  the train reviews with one negative review in eight kept (48 positive, 6 negative), for
                        `--classify.class_weights balanced`
- reviews_tags_train.jsonl, the same reviews with several classes each (multi-label): the sentiment, and
  reviews_tags_eval.jsonl   "entertainment" (film, book, concert, game) or "hospitality" (food, hotel, service)
- entities_train.jsonl  sentences whose people (PER), places (LOC) and companies (ORG) are tagged, for a token
                        classifier (`--objective token_classify`): as CoNLL words and BIO tags
- entities_eval.jsonl   held-out sentences as texts and character spans (doccano's shape), their people, places
                        and companies never in the train file

    python examples/data/make_files.py            # rewrites the files next to this script

The dates examples are the task's first 320 training examples (seed 0), the same in every file.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from lorakit.data.tasks import make_pairs, make_task

HERE = Path(__file__).resolve().parent
N = 320
SYSTEM = "You convert dates to ISO 8601."


def files() -> dict[str, str]:
    """File name -> its text."""
    train, _ = make_task("dates", n_train=N, n_eval=1, seed=0)
    pairs = []
    for ex in train:
        instruction, _, date = ex["prompt"].rpartition(": ")
        pairs.append((instruction + ":", date, ex["completion"]))
    alpaca = [{"instruction": i, "input": d, "output": a} for i, d, a in pairs]
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": f"{i}\n{d}"}, {"from": "gpt", "value": a}],
            "system": SYSTEM,
        }
        for i, d, a in pairs
    ]
    table = io.StringIO(newline="")
    writer = csv.writer(table, lineterminator="\n")
    writer.writerows([("question", "answer"), *((f"{i} {d}", a) for i, d, a in pairs)])
    rated = [
        {
            "prompt": p["prompt"],
            "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
            "label": i % 2 == 0,
        }
        for i, p in enumerate(make_pairs("dates", n_train=N, n_eval=1, seed=0)[0])
    ]
    sys.path.insert(0, str(HERE.parent))  # examples/classify.py: its reviews
    from classify import BAD, GOOD, THINGS, reviews

    GROUPS = {"entertainment": ("film", "book", "concert", "game"), "hospitality": ("food", "hotel", "service")}

    sentiment = {1: "positive", 0: "negative"}
    train_reviews, eval_reviews = (
        [{"text": t, "label": sentiment[y]} for t, y in part]
        for part in (reviews(GOOD[:6], BAD[:6]), reviews(GOOD[6:], BAD[6:]))
    )
    def tags(r: dict) -> dict:
        thing = next(t for t in THINGS if t in r["text"])
        group = [g for g, things in GROUPS.items() if thing in things]
        return {"text": r["text"], "label": [r["label"], *group]}

    negatives = [i for i, r in enumerate(train_reviews) if r["label"] == "negative"]
    dropped = set(negatives) - set(negatives[::8])
    imbalanced = [r for i, r in enumerate(train_reviews) if i not in dropped]
    return {
        "dates_alpaca.json": json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n",
        "dates_sharegpt.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sharegpt),
        "dates.csv": table.getvalue(),
        "dates_rated.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rated),
        "reviews_train.jsonl": "".join(json.dumps(r) + "\n" for r in train_reviews),
        "reviews_eval.jsonl": "".join(json.dumps(r) + "\n" for r in eval_reviews),
        "reviews_imbalanced.jsonl": "".join(json.dumps(r) + "\n" for r in imbalanced),
        "reviews_tags_train.jsonl": "".join(json.dumps(tags(r)) + "\n" for r in train_reviews),
        "reviews_tags_eval.jsonl": "".join(json.dumps(tags(r)) + "\n" for r in eval_reviews),
        "entities_train.jsonl": "".join(json.dumps(conll(e)) + "\n" for e in entities(96, False, 5)),
        "entities_eval.jsonl": "".join(
            json.dumps({"text": e["text"], "entities": e["spans"]}) + "\n" for e in entities(32, True, 6)
        ),
    }


# entities: the train file's names, places and companies, and the eval file's (never in the train file)
PEOPLE = (["Anna Schmidt", "Bob Jones", "Maria Garcia", "Kenji Tanaka", "Fatima Khan", "Lars Olsen"],
          ["Chloe Martin", "Ivan Petrov", "Aisha Bello", "Tom Walsh"])
PLACES = (["Paris", "New York", "Berlin", "Lagos", "Osaka", "Lima"], ["Madrid", "Cairo", "Toronto", "Hanoi"])
COMPANIES = (["Siemens", "Nokia", "Airbus", "Unilever"], ["Toyota", "Philips"])
SENTENCES = [
    "{PER} flew to {LOC} for {ORG} on Monday.",
    "{ORG} opened an office in {LOC} last year.",
    "{PER} works for {ORG} in {LOC}.",
    "{PER} met {PER} in {LOC}.",
    "After the talks in {LOC}, {PER} left {ORG}.",
    "{ORG} hired {PER} to run its {LOC} branch.",
    "In {LOC}, {PER} and {PER} founded a startup.",
    "{PER} said {ORG} would build a plant near {LOC}.",
]


def entities(n: int, held_out: bool, seed: int) -> list[dict]:
    """`n` sentences with their entities as {"text", "spans"} (the train names, or the held-out ones)."""
    import random

    rng = random.Random(seed)
    pools = {"PER": PEOPLE[held_out], "LOC": PLACES[held_out], "ORG": COMPANIES[held_out]}
    out = []
    for i in range(n):
        template, text, spans = SENTENCES[i % len(SENTENCES)], "", []
        for j, piece in enumerate(template.replace("}", "{").split("{")):
            if j % 2 == 0:
                text += piece
                continue
            name = rng.choice(pools[piece])
            spans.append([len(text), len(text) + len(name), piece])
            text += name
        out.append({"text": text, "spans": spans})
    return out


def conll(item: dict) -> dict:
    """A {"text", "spans"} sentence as CoNLL's words and BIO tags (commas and full stops words of their own)."""
    text, words, tags, at = item["text"], [], [], 0

    def outside(part: str) -> None:
        for w in part.replace(",", " ,").replace(".", " .").split():
            words.append(w)
            tags.append("O")

    for start, end, kind in item["spans"]:
        outside(text[at:start])
        name = text[start:end].split(" ")
        words.extend(name)
        tags.extend([f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1))
        at = end
    outside(text[at:])
    return {"tokens": words, "tags": tags}


def main() -> int:
    for name, text in files().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
