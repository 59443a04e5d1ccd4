"""Quality of the int8 decoding route on the real default model (SmolLM2-135M-Instruct), against NF4's own error.

The model is loaded unquantized and straight into NF4. Real chat prompts and the NF4 model's own greedy replies
(40 tokens, exact route) are fed one token at a time with the KV cache, so every step is a one-row product
(the decoding path), through the unquantized model, the NF4 model's exact fp32 route and its int8 route. For
each pair it prints how often the next-token choice agrees, and the mean KL divergence of the next-token
distributions a position.

    python benchmarks/bench_gemv_quality.py
"""

from __future__ import annotations

import torch

import lorakit
from lorakit.quant import native

QUESTIONS = (
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea.",
    "How do I sort a list in Python?",
)


def teacher_forced(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at each position, one token a step with the KV cache."""
    out = model(input_ids=ids[:, :1], use_cache=True)
    steps, cache = [out.logits[0, -1]], out.past_key_values
    for i in range(1, ids.shape[1]):
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[0, -1])
        cache = out.past_key_values
    return torch.log_softmax(torch.stack(steps).double(), -1)


def compare(p: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """(share of positions where the top token agrees, mean KL(p || q))."""
    agree = float((p.argmax(-1) == q.argmax(-1)).double().mean())
    return agree, float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    torch.set_num_threads(2)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, int8 route available: {native.int8_route()}")
    nf4, tok, _ = lorakit.load_quantized(None)
    full, _ = lorakit.load_model(None)
    nf4.eval(), full.eval()
    print(
        "| prompt | positions | top-1 agree / KL: NF4 exact vs unquantized | int8 vs exact | int8 vs unquantized |"
    )
    print("|---|---:|---|---|---|")
    for question in QUESTIONS:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
        )
        prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
        with torch.no_grad():
            old = native.set_gemv_int8(False)
            reply = nf4.generate(prompt, max_new_tokens=40, do_sample=False)
            exact, ref = teacher_forced(nf4, reply), teacher_forced(full, reply)
            native.set_gemv_int8(True)
            int8 = teacher_forced(nf4, reply)
            native.set_gemv_int8(old)
        cells = [compare(ref, exact), compare(exact, int8), compare(ref, int8)]
        text = " | ".join(f"{a:.1%} / {kl:.3f}" for a, kl in cells)
        print(f"| {question} | {reply.shape[1]} | {text} |")


if __name__ == "__main__":
    main()
