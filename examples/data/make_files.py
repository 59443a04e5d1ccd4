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
    }


def main() -> int:
    for name, text in files().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
