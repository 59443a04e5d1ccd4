"""What was adapted: trainable vs total parameters, and per layer the seed's reduction r·(d+k) vs d·k."""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.inject import lora_layers
from lorakit.params import param_wrappers
from lorakit.quant import quant_stats, quantized_modules
from lorakit.saved import saved_modules
from lorakit.token_rows import token_wrappers
from lorakit.tying import TiedAdapter


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Counts for `model` with its adapters.

    Returns a dict with `total`, `trainable`, `trainable_percent`, `adapters` ({name: parameter count}) and
    `layers`: one row per (module, adapter) with `d` (out features), `k` (fan-in), `r`, `full` = d·k,
    `lora` = r·(d+k) and `reduction` = full / lora; `saved`: one row per (module, adapter) that an adapter saves
    whole in its own copy (modules_to_save), with its parameter count; `tokens`: one row per (embedding, adapter)
    with rows trained alone (trainable_token_indices), and the heads tied to them; `params`: one row per
    (parameter, adapter) adapted through target_parameters. A 4-bit base adds `quantization` (see
    `lorakit.quant.quant_stats`: bits per parameter of its quantized layers); `total` counts the weights those
    layers encode, not their packed bytes.
    """
    found = quantized_modules(model)
    packed = {id(getattr(m, "weight", None)) for _, m in found}  # bitsandbytes' Params4bit hold packed bytes
    total = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    total += sum(m.in_features * m.out_features for _, m in found)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows: list[dict[str, Any]] = []
    per_adapter: dict[str, int] = {}
    for name, layer in lora_layers(model):
        d, k = layer.handler.dims(layer.base_layer)
        for aname, adapter in layer.adapters.items():
            r = adapter.r
            n_params = sum(p.numel() for p in adapter.parameters())
            per_adapter[aname] = per_adapter.get(aname, 0) + n_params
            tied = isinstance(adapter, TiedAdapter)  # the embedding's weight and adapter: counted there
            # r·(d+k), or BD-LoRA's blocks, plus a variant's own (DoRA's magnitudes, KaSA's singular values)
            stored = sum(t.numel() for t in adapter.adapter_params(layer.handler).values())
            rows.append(
                {
                    "module": name,
                    "type": type(layer.base_layer).__name__,
                    "adapter": aname,
                    "variant": adapter.variant.name,
                    "r": r,
                    "alpha": adapter.alpha,
                    "d": d,
                    "k": k,
                    "full": 0 if tied else d * k,
                    "lora": 0 if tied else stored,
                    "reduction": d * k / stored,
                    "tied": tied,
                }
            )
    saved = []
    seen: set[int] = set()  # a tied head's copy holds its embedding's copy's weight (ensure_weight_tying)
    for name, wrapper in saved_modules(model):
        for aname, module in wrapper.modules_to_save.items():
            n_params = sum(p.numel() for p in module.parameters() if id(p) not in seen)
            seen |= {id(p) for p in module.parameters()}
            per_adapter[aname] = per_adapter.get(aname, 0) + n_params
            saved.append(
                {"module": name, "type": type(module).__name__, "adapter": aname, "params": n_params}
            )
    params = []
    for name, wrapper in param_wrappers(model):
        for aname, factors in wrapper.lora.items():
            for p, f in factors.items():
                n_params = f.lora_A.numel() + f.lora_B.numel()
                per_adapter[aname] = per_adapter.get(aname, 0) + n_params
                shape = tuple(getattr(wrapper.base_layer, p).shape)
                params.append(
                    {"parameter": f"{name}.{p}", "shape": shape, "adapter": aname, "r": f.r, "params": n_params}
                )
    tokens = []
    for name, wrapper in token_wrappers(model):
        if wrapper.tied is not None:
            continue
        tied = [n for n, w in token_wrappers(model) if w.tied is wrapper]
        for aname, delta in wrapper.trainable_tokens_delta.items():
            per_adapter[aname] = per_adapter.get(aname, 0) + delta.numel()
            tokens.append(
                {
                    "module": name,
                    "adapter": aname,
                    "rows": delta.shape[0],
                    "params": delta.numel(),
                    "tied": tied,
                }
            )
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "adapters": per_adapter,
        "layers": rows,
        "saved": saved,
        "tokens": tokens,
        "params": params,
        "quantization": quant_stats(model),
    }


def format_report(report: dict[str, Any], *, max_rows: int = 40) -> str:
    """A plain-text table of `parameter_report`'s result."""
    lines = [
        f"{'module':<48} {'type':<10} {'adapter':<10} {'r':>4} {'d':>6} {'k':>6} {'d·k':>10} {'r·(d+k)':>9} {'×less':>7}"
    ]
    rows = report["layers"]
    for row in rows[:max_rows]:
        if row.get("tied"):
            lines.append(
                f"{row['module'][-48:]:<48} {row['type'][:10]:<10} {row['adapter'][:10]:<10} {row['r']:>4} {row['d']:>6} "
                f"{row['k']:>6}   the input embedding's weight and adapter, transposed (ensure_weight_tying)"
            )
            continue
        lines.append(
            f"{row['module'][-48:]:<48} {row['type'][:10]:<10} {row['adapter'][:10]:<10} {row['r']:>4} {row['d']:>6} "
            f"{row['k']:>6} {row['full']:>10,} {row['lora']:>9,} {row['reduction']:>7.1f}"
        )
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows")
    full = sum(r["full"] for r in rows)
    lora = sum(r["lora"] for r in rows)
    if rows:
        lines.append(f"adapted weights: {full:,} -> LoRA parameters: {lora:,} ({full / lora:.1f}x fewer)")
    for row in report.get("saved", []):
        lines.append(
            f"saved whole (modules_to_save): {row['module']} ({row['type']}) for adapter {row['adapter']!r}: "
            f"{row['params']:,} params"
        )
    for row in report.get("params", []):
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"parameter (target_parameters): {row['parameter']} ({shape}) for adapter {row['adapter']!r}: "
            f"r={row['r']}, {row['params']:,} params"
        )
    for row in report.get("tokens", []):
        tied = f" (shared by the tied {', '.join(row['tied'])})" if row["tied"] else ""
        lines.append(
            f"token rows (trainable_token_indices): {row['module']} for adapter {row['adapter']!r}: "
            f"{row['rows']} rows, {row['params']:,} params{tied}"
        )
    lines.append(
        f"trainable params: {report['trainable']:,} || all params: {report['total']:,} "
        f"|| trainable%: {report['trainable_percent']:.4f}"
    )
    q = report.get("quantization")
    if q:
        dq = {True: ", double quant", False: ""}.get(q["double_quant"], "")
        lines.append(
            f"4-bit base: {q['method']}{dq}: {q['layers']} layers, {q['params']:,} weights in "
            f"{q['bytes'] / 2**20:.1f} MiB = {q['bits_per_param']:.3f} bits/param"
        )
    return "\n".join(lines)
