"""Structured output's cost per generated token in the serve engine: the same chat requests with and without
`response_format: {"type": "json_object"}` (or, with `--schema`, a JSON Schema of a cat).

The default model in float32, the engine in this process, `--rows` chat requests at once (greedy), `--rounds`
rounds alternating the two modes. A plain request runs to `--max-tokens` (`ignore_eos`); a JSON one ends with its
object, so its batch shrinks as objects close and the wall time per token of the two is not the same work. The
figure that is: the time spent choosing tokens (`Guide.pick`, timed around each call) per JSON token, against
the wall time per token of the plain batch.

    .venv/bin/python benchmarks/bench_guide.py                       # 8 rows, 64 tokens, 3 rounds
    .venv/bin/python benchmarks/bench_guide.py --schema              # the same with examples/structured's cat
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

QUESTIONS = [
    "Describe a cat as a JSON object.",
    "List three fruits with their colours.",
    "Give a recipe for pancakes.",
    "Describe the planet Mars.",
    "Name two capitals and their countries.",
    "Describe a car.",
    "What is a neural network?",
    "Describe your favourite book.",
]


SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "structured" / "cat.schema.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--schema", action="store_true", help="guide by cat.schema.json instead of any JSON object"
    )
    args = p.parse_args(argv)

    import torch

    import lorakit
    from lorakit.bank import AdapterBank
    from lorakit.serve import guide
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.guide import JsonPrefix
    from lorakit.serve.requests import Delta, Done, Failed, GenRequest, SamplingParams
    from lorakit.serve.schema import JSON_OBJECT, compile_schema

    grammar = compile_schema(json.loads(SCHEMA.read_text())) if args.schema else JSON_OBJECT
    picking = [0.0, 0]  # seconds in Guide.pick, calls
    original = guide.Guide.pick

    def timed_pick(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            picking[0] += time.perf_counter() - t0
            picking[1] += 1

    guide.Guide.pick = timed_pick
    model, tok = lorakit.load_model(None)
    eng = Engine(model, tok, AdapterBank(model), EngineConfig(max_batch=args.rows, wait_ms=50))
    prompts = []
    for i in range(args.rows):
        text = tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])

    def batch(json_mode: bool) -> tuple[float, int, int]:
        queues = []
        for ids in prompts:
            q: queue.Queue = queue.Queue()
            sp = SamplingParams(
                max_tokens=args.max_tokens,
                temperature=0,
                guide=grammar if json_mode else None,
                ignore_eos=not json_mode,
            )
            eng.submit(GenRequest(ids, None, sp, q.put))
            queues.append(q)
        t0 = time.perf_counter()
        tokens = whole = 0
        for q in queues:
            parts = []
            while not isinstance(ev := q.get(timeout=900), (Done, Failed)):
                if isinstance(ev, Delta):
                    parts.append(ev.text)
            if isinstance(ev, Failed):
                raise SystemExit(ev.message)
            tokens += ev.completion_tokens
            if json_mode:
                text = "".join(parts)
                if ev.finish_reason == "stop":
                    json.loads(text)
                    whole += 1
                elif not JsonPrefix(grammar).feed(text):
                    raise SystemExit(f"JSON mode produced an invalid prefix: {text!r}")
        return time.perf_counter() - t0, tokens, whole

    eng.start()
    batch(True)  # warm-up (and the token texts' cache)
    batch(False)
    picking[:] = [0.0, 0]
    per_token: dict[str, list[float]] = {"plain": [], "json": []}
    whole_objects = []
    for r in range(args.rounds):
        for mode in ("json", "plain") if r % 2 == 0 else ("plain", "json"):
            wall, tokens, whole = batch(mode == "json")
            per_token[mode].append(wall / tokens * 1000)
            if mode == "json":
                whole_objects.append(whole)
    eng.stop()
    plain, guided = statistics.median(per_token["plain"]), statistics.median(per_token["json"])
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs; {args.rows} chat rows "
        f"at once, greedy, up to {args.max_tokens} tokens; {args.rounds} rounds alternating; guided by "
        f"{'the cat schema' if args.schema else 'any JSON object'}"
    )
    print("| mode | ms per generated token of the batch, median (each round) |")
    print("|---|---|")
    for mode, value in (("plain", plain), ("json", guided)):
        print(f"| {mode} | {value:.1f} ({', '.join(f'{v:.1f}' for v in per_token[mode])}) |")
    pick_ms = picking[0] / max(picking[1], 1) * 1000
    print(
        f"\nchoosing a JSON token (Guide.pick): {pick_ms:.2f} ms a token over {picking[1]} tokens, "
        f"{pick_ms / plain:.2f}x the plain batch's wall time per token ({plain:.1f} ms); whole objects per JSON "
        f"round: {whole_objects} of {args.rows} (the rest cut at max_tokens, valid prefixes). The JSON batch's own "
        f"wall time per token, {guided:.1f} ms, also pays for a batch that shrinks as objects close."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
