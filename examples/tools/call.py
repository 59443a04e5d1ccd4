"""Teach SmolLM2 to call your functions, then let `lorakit serve` turn its answers into OpenAI tool calls.

    python examples/tools/call.py runs/tools        # about a minute on 2 CPU cores

1. Writes runs/tools/train.jsonl: 320 conversations in OpenAI's fine-tuning format for function calling (the
   record's `tools`, an assistant's `tool_calls`), each asking for the weather in a city or for a currency
   conversion.
2. Trains an adapter on it with `lorakit train` (12 steps; docs/data.md#tool-calls).
3. Starts `lorakit serve --adapter tools=...` and asks questions about cities and amounts the training never saw,
   through the OpenAI client, offering the same two functions with tool_choice "auto" (the model is free to
   answer in text): once the base model, once the adapter. Prints each answer's calls, and how many were right.

Needs the OpenAI client (`pip install openai`; the test extras have it).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "convert_currency",
        "description": "Convert an amount of money.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string"},
                "to": {"type": "string"},
            },
            "required": ["amount", "from", "to"],
        },
    },
]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Toronto", "Madrid", "Hanoi", "Denver", "Perth", "Dakar"]
CITIES += ["Quito", "Seoul", "Vienna", "Bogota", "Austin", "Zurich", "Manila", "Lagos", "Prague", "Dublin"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "INR", "BRL"]
WEATHER_ASKS = [
    "What's the weather in {city}?",
    "Is it raining in {city} right now?",
    "How warm is it in {city} today?",
    "Tell me the weather for {city}.",
]
MONEY_ASKS = [
    "Convert {amount} {src} to {dst}.",
    "How much is {amount} {src} in {dst}?",
    "What are {amount} {src} worth in {dst}?",
]
# what the training never saw: other cities, other amounts
HELD_OUT = [
    ("What's the weather in Nairobi?", "get_weather", {"city": "Nairobi"}),
    ("Is it raining in Helsinki right now?", "get_weather", {"city": "Helsinki"}),
    ("Tell me the weather for Santiago.", "get_weather", {"city": "Santiago"}),
    ("Convert 730 EUR to JPY.", "convert_currency", {"amount": 730, "from": "EUR", "to": "JPY"}),
    ("How much is 41 GBP in USD?", "convert_currency", {"amount": 41, "from": "GBP", "to": "USD"}),
    ("What are 1200 CAD worth in CHF?", "convert_currency", {"amount": 1200, "from": "CAD", "to": "CHF"}),
]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` one-call conversations in OpenAI's fine-tuning format."""
    rng = random.Random(seed)
    held = {a["amount"] for _, _, a in HELD_OUT if "amount" in a}  # (the held-out cities are not in CITIES)
    rows = []
    while len(rows) < n:
        if rng.random() < 0.5:
            city = rng.choice(CITIES)
            ask, name, args = rng.choice(WEATHER_ASKS).format(city=city), "get_weather", {"city": city}
        else:
            amount = rng.choice([rng.randint(2, 99), rng.randint(100, 2000)])
            if amount in held:
                continue
            src, dst = rng.sample(CURRENCIES, 2)
            ask = rng.choice(MONEY_ASKS).format(amount=amount, src=src, dst=dst)
            name, args = "convert_currency", {"amount": amount, "from": src, "to": dst}
        call = {
            "id": f"call_{len(rows)}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "tool_calls": [call]}]
        rows.append({"messages": messages, "tools": TOOLS})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_all(client: OpenAI, model: str) -> list[tuple[str, bool]]:
    """For each held-out question: what came back (as text), and whether it is the right call. The questions go
    together, as concurrent clients' would: the server decodes them in one batch."""

    def ask(held: tuple[str, str, dict]) -> tuple[str, bool]:
        question, name, args = held
        reply = (
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                tools=TOOLS,
                tool_choice="auto",
                max_tokens=40,
                temperature=0,
            )
            .choices[0]
            .message
        )
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls or []]
        shown = ", ".join(f"{n}({json.dumps(a)})" for n, a in calls) if calls else f"text: {reply.content!r}"
        return shown, calls == [(name, args)]

    with ThreadPoolExecutor(len(HELD_OUT)) as pool:
        return list(pool.map(ask, HELD_OUT))


def main(out: Path, steps: int = 12, eval_limit: int = 8) -> int:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(320)))
    print(f"1. wrote {data}: 320 conversations, each with one call")
    run = out / "run"
    train = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        "--data.train_file",
        str(data),
        "--train.out_dir",
        str(run),
    ]
    train += [
        "--data.max_len",
        "384",
        "--eval.max_new_tokens",
        "48",
        "--eval.limit",
        str(eval_limit),
        "--train.steps",
        str(steps),
    ]
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run / "summary.json").read_text())
    acc = summary["before"]["accuracy"], summary["after"]["accuracy"]
    print(f"2. trained {run / 'adapter'}: exact-match accuracy of the calls {acc[0]:.1%} -> {acc[1]:.1%}")
    port = free_port()
    log = open(out / "server.log", "wb")  # noqa: SIM115 - closed after the server
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            "--port",
            str(port),
            "--adapter",
            f"tools={run / 'adapter'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(600):
            try:
                base = client.models.list().data[0].id
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: see {out / 'server.log'}") from None
                time.sleep(0.5)
        else:
            raise SystemExit("the server did not come up in 5 minutes")
        print("3. questions the training never saw, tool_choice auto:")
        for label, model in (("base", base), ("adapter", "tools")):
            results = ask_all(client, model)
            for (question, _, _), (shown, right) in zip(HELD_OUT, results, strict=True):
                print(f"   {label:7} {'right' if right else 'wrong'}  {question}  ->  {shown}")
            print(f"   {label}: {sum(r for _, r in results)}/{len(results)} right calls")
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="runs/tools", help="where the data, the run and the log go")
    p.add_argument("--steps", type=int, default=12, help="training steps (default: 12)")
    p.add_argument(
        "--eval-limit",
        type=int,
        default=8,
        help="held-out conversations the run evaluates, before and after (8)",
    )
    args = p.parse_args()
    sys.exit(main(Path(args.out), args.steps, args.eval_limit))
