"""Write the English dialogs of the `chatterbot-corpus` package as chat JSONL: a real, offline fine-tuning set.

Each conversation of the corpus's 21 English topic files (greetings, computers, psychology, ...) becomes one line
`{"messages": [...]}` with the turns alternating user, assistant, user, ... (a conversation with an even number
of turns ends on the assistant; an odd one loses its last turn). Every tenth conversation, in file order, goes to
the eval file; the rest to the train file. The package is data only (`pip install chatterbot-corpus`, part of the
`bench` extra).

    .venv/bin/python benchmarks/chat_corpus.py --out /tmp/chat      # writes train.jsonl and eval.jsonl

With `--pairs`, each conversation's first exchange becomes an embedding model's pair instead (`lorakit train
--objective embed`, docs/embeddings.md): `{"anchor": what the user says, "positive": the answer}`, so that a
question finds its answer among all the answers; a pair whose question or answer occurs in an earlier
conversation is left out (the corpus repeats some), so that each held-out answer is one the training never saw.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import yaml


def conversations() -> list[list[str]]:
    """Every English conversation of the corpus, in file and then in file order."""
    root = resources.files("chatterbot_corpus") / "data" / "english"
    out = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns[: len(turns) // 2 * 2])
    return out


def write(out: Path, pairs: bool = False) -> tuple[Path, Path, int, int]:
    out.mkdir(parents=True, exist_ok=True)
    convs = conversations()
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    seen: set[str] = set()
    for i, turns in enumerate(convs):
        if pairs:
            question, answer = turns[0], turns[1]
            if question in seen or answer in seen or question == answer:
                continue
            seen.update((question, answer))
            record = {"anchor": question, "positive": answer}
        else:
            roles = ["user", "assistant"] * (len(turns) // 2)
            record = {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]}
        lines["eval" if i % 10 == 0 else "train"].append(json.dumps(record))
    paths = []
    for split, rows in lines.items():
        path = out / f"{split}.jsonl"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], len(lines["train"]), len(lines["eval"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--pairs", action="store_true", help="question and answer pairs, for an embedding model")
    args = p.parse_args()
    train, dev, n_train, n_eval = write(args.out, args.pairs)
    what = "pairs" if args.pairs else "conversations"
    print(f"{train}: {n_train} {what}; {dev}: {n_eval}")


if __name__ == "__main__":
    main()
