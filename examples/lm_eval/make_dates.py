"""Write examples/lm_eval/dates.jsonl: the built-in `dates` task's held-out examples, for lm-evaluation-harness.

They are `make_task("dates")`'s eval split, the examples `lorakit eval --task dates` scores, each prompt rendered
with the default model's chat template exactly as `lorakit eval` renders it (`prompt_text`), with the expected
answer. `lorakit_dates.yaml` generates from those texts through `/v1/completions` (generate-until), so lm_eval's
exact match on an adapter served by `lorakit serve` can be set beside `lorakit eval`'s accuracy of that adapter.

    .venv/bin/python examples/lm_eval/make_dates.py        # from the repository root
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dates.jsonl"


def rows() -> list[dict[str, str]]:
    from transformers import AutoTokenizer

    from lorakit.data.tasks import make_task
    from lorakit.models import resolve_model_dir
    from lorakit.train.evaluate import _prompt_text, prompt_and_answer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    out = []
    for ex in make_task("dates")[1]:
        prompt, answer, extra = prompt_and_answer(ex, tok)
        # "\n": a bare ISO date would be read as a timestamp by the JSON loader lm_eval uses (pyarrow's), and
        # compared as "1998-07-02 00:00:00"; whitespace at either end is ignored, as `lorakit eval` strips it
        out.append({"prompt_text": _prompt_text(tok, prompt, True, extra), "answer": answer + "\n"})
    return out


def main() -> int:
    from lorakit.atomic import atomic_file

    text = "".join(json.dumps(r) + "\n" for r in rows())
    atomic_file(OUT, text.encode())
    print(f"wrote {OUT} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
