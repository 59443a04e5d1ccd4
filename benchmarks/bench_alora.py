"""aLoRA's point, measured: an adapter that continues from the base model's KV cache of a conversation, against a
plain LoRA adapter that has to prefill the whole conversation again, and against PEFT's aLoRA doing the same reuse.

The real default model (fp32) and a conversation of about `--context` tokens built from the chatterbot corpus's
English dialogs (chat template), ending with the assistant's turn "<|im_start|>assistant\\n", which is the aLoRA
adapter's invocation. The base model prefilled the conversation before the adapter is asked (untimed, as in an
agent that was talking with the base model). Timed, to the first token's logits:
- `lora-full`: lorakit, a plain LoRA adapter (r=16, all linear layers): it prefills the whole conversation;
- `alora-reuse`: lorakit, an aLoRA adapter of the same shape: a copy of the base's cache (timed too), then a forward
  over the invocation's tokens only;
- `peft-alora-reuse`: PEFT's aLoRA, the same.
Each mode runs in its own process (`--child`), the processes interleaved over `--rounds` rounds in rotating order;
each reports the median of `--iters` timed forwards after 2 warm-ups. The adapters' weights are random (small):
the cost is the same as a trained one's. The children also check that the reuse gives the logits of a full aLoRA
forward.

    .venv/bin/python benchmarks/bench_alora.py                  # 1,024 tokens, 3 rounds of 5 forwards
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("lora-full", "alora-reuse", "peft-alora-reuse")
INVOCATION = "<|im_start|>assistant"


def conversation(tok, context: int):
    """input_ids (1, T) of a chat of about `context` tokens ending with the assistant's turn, and where the last
    invocation starts."""
    from chat_corpus import conversations

    messages = []
    for turns in conversations():
        for i, t in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        text = tok.apply_chat_template(messages + [{"role": "user", "content": "Was that right?"}], tokenize=False, add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= context:
            break
    x = tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = tok.encode(INVOCATION, add_special_tokens=False)
    start = max(i for i in range(x.shape[1]) if x[0, i : i + len(ids)].tolist() == ids)
    return x, ids, start


def child(mode: str, context: int, iters: int) -> dict:
    import torch

    import lorakit

    torch.manual_seed(0)
    model, tok = lorakit.load_model()
    model.eval()
    x, ids, start = conversation(tok, context)
    if mode.startswith("peft"):
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", alora_invocation_tokens=ids)
        )
        disabled = model.disable_adapter
    else:
        alora = mode == "alora-reuse"
        config = lorakit.LoraConfig(r=16, alpha=32, targets="all-linear", alora_invocation_tokens=ids if alora else None)
        lorakit.inject(model, config)
        disabled = lambda: lorakit.disabled(model)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        with disabled():
            cache = model(input_ids=x[:, :start], use_cache=True).cache
        check = None
        if mode != "lora-full":
            full = model(input_ids=x).logits[:, start:]
            part = model(input_ids=x[:, start:], cache=copy.deepcopy(cache)).logits
            check = float((full - part).abs().max())

        def step():
            if mode == "lora-full":
                return model(input_ids=x).logits[:, -1]
            return model(input_ids=x[:, start:], cache=copy.deepcopy(cache)).logits[:, -1]

        times = []
        for i in range(iters + 2):
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "seconds": statistics.median(times),
        "tokens": x.shape[1],
        "suffix": x.shape[1] - start,
        "max_abs_diff_reuse_vs_full": check,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024, help="conversation tokens (about)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.context, a.iters)))
        return
    import torch

    print(f"cpu: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(a.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            cmd = [sys.executable, __file__, "--child", mode, "--context", str(a.context), "--iters", str(a.iters)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    med = {m: statistics.median(r["seconds"] for r in results[m]) for m in MODES}
    first = results[MODES[0]][0]
    print(f"\nconversation: {first['tokens']} tokens; the adapter's own part: {results['alora-reuse'][0]['suffix']} tokens")
    for m in MODES:
        print(f"{m:18s} {med[m] * 1000:9.1f} ms  (median of {a.rounds} processes' medians of {a.iters})")
    print(f"plain LoRA's full prefill / aLoRA's reuse: {med['lora-full'] / med['alora-reuse']:.1f}x")
    print(f"PEFT's aLoRA reuse / lorakit's: {med['peft-alora-reuse'] / med['alora-reuse']:.2f}x")
    diffs = [r["max_abs_diff_reuse_vs_full"] for m in MODES[1:] for r in results[m]]
    print(f"reuse vs full aLoRA forward, largest logit difference: {max(diffs):.2e}")


if __name__ == "__main__":
    main()
