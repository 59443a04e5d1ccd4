"""Ollama Modelfiles: `FROM` the base (or the merged model), `ADAPTER` the GGUF adapter, and the chat template.

Ollama's templates are Go templates, not Jinja. The base's Jinja template is recognised by its markers (ChatML's
`<|im_start|>`, Llama 3's `<|start_header_id|>`) and written as the matching Go template with its stop token; a
default system prompt that the Jinja template adds by itself (SmolLM2 does) becomes `SYSTEM`. For a template of
another kind no TEMPLATE line is written, and Ollama falls back on the GGUF file's own `tokenizer.chat_template`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_file

CHATML = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

TEMPLATES = [  # (marker in the Jinja template, Go template, stop tokens, system prompt's opening, its end)
    ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_start|>system\n", "<|im_end|>"),
    (
        "<|start_header_id|>",
        LLAMA3,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|start_header_id|>system<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
]


def modelfile_text(base: str, adapter: str | None, tokenizer: Any = None) -> str:
    """A Modelfile that `ollama create NAME -f FILE` takes with no editing."""
    lines = ["# written by lorakit: ollama create NAME -f THIS_FILE", f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    jinja = getattr(tokenizer, "chat_template", None)
    kind = next((t for t in TEMPLATES if isinstance(jinja, str) and t[0] in jinja), None)
    if kind is None:
        lines.append("# no TEMPLATE: Ollama uses the GGUF file's tokenizer.chat_template")
        return "\n".join(lines) + "\n"
    _, go, stops, sys_open, sys_close = kind
    lines.append(f'TEMPLATE """{go}"""')
    system = default_system(tokenizer, sys_open, sys_close)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def default_system(tokenizer: Any, opening: str, closing: str) -> str | None:
    """The system prompt the Jinja template adds by itself when a conversation has none, or None."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # a template that needs more than a user turn: no default to find
        return None
    start = text.find(opening)
    if start < 0:
        return None
    start += len(opening)
    end = text.find(closing, start)
    return text[start:end].strip() or None if end > 0 else None


def write_modelfile(
    gguf_path: str | os.PathLike, base: str | os.PathLike, adapter: bool, tokenizer: Any = None
) -> Path:
    """Write `<gguf file name>.Modelfile` beside `gguf_path` (atomically). With `adapter`, the GGUF file is the
    adapter and `base` the model it runs on; else the GGUF file is the whole model."""
    gguf_path = Path(gguf_path)
    here = f"./{gguf_path.name}"
    text = (
        modelfile_text(str(Path(base).resolve()), here, tokenizer)
        if adapter
        else modelfile_text(here, None, tokenizer)
    )
    out = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    atomic_file(out, text.encode())
    return out
