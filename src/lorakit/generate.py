"""Text generation with the tokenizer's chat template (greedy by default)."""

from __future__ import annotations

import torch
from torch import nn


def format_prompt(tokenizer, prompt: str, *, chat: bool = True, system: str | None = None) -> str:
    """Apply the tokenizer's chat template (if it has one and `chat`) to a single user turn."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    temperature: float = 0.0,
    system: str | None = None,
) -> str:
    """The model's continuation of `prompt` (only the new text). temperature 0 means greedy decoding."""
    text = format_prompt(tokenizer, prompt, chat=chat, system=system)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = dict(
        do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
