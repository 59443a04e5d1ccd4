"""`lorakit inspect`, `merge`, `extract`, `convert` and `combine`: the commands that read, write or report adapter files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.cli.common import MODEL_HELP, add_allow_pickle, load
from lorakit.cliargs import positive_int


def configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", nargs="?", help="an adapter folder, or a model (folder/.gguf); default: the default model"
    )
    p.add_argument("--model", help="apply the adapter to this model and report trainable vs total parameters")
    p.add_argument("--apply", action="store_true", help="apply the adapter to the default model and report")
    p.add_argument(
        "--r", type=positive_int, default=8, help="rank for a hypothetical LoRA on a model (default: 8)"
    )
    p.add_argument(
        "--targets", default="all-linear", help="targets for a hypothetical LoRA, comma-separated or a regex"
    )
    p.add_argument("--rows", type=positive_int, default=40, help="table rows to print (default: 40)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quantize", choices=["nf4"], help="quantize to 4 bits first (QLoRA): bits/param")


def cmd_inspect(args: argparse.Namespace) -> int:
    import lorakit

    target = Path(args.target) if args.target else None
    gguf_adapter = target is not None and lorakit.ondevice.is_gguf_adapter(target)
    is_adapter = target is not None and (
        (target / "adapter_config.json").exists() or gguf_adapter
    )  # even broken
    if gguf_adapter and args.model is None and not args.apply:
        info = lorakit.describe_adapter(target)
        print(json.dumps(info, indent=2, default=str) if args.json else _format_gguf(info, args.rows))
        return 0
    if target is not None and args.model is None and not args.apply and lorakit.is_ladder_folder(target):
        info = lorakit.describe_adapter(target)
        print(json.dumps(info, indent=2, default=str) if args.json else lorakit.format_ladder(info))
        return 0
    if is_adapter and args.model is None and not args.apply:
        info = lorakit.describe_adapter(target)
        if args.json:
            print(json.dumps({**info, "config": info["config"].to_peft_dict()}, indent=2, default=str))
            return 0
        _print_adapter(info)
        base_q = lorakit.quant.adapter_base_quantization(target)
        if base_q:
            print(f"trained on a 4-bit base: {json.dumps(base_q, sort_keys=True)}")
        return 0
    model_spec = args.model if target is None or is_adapter else str(target)
    if args.quantize:  # straight into 4 bits, as lorakit train --model.quantize does
        model, _, qreport = lorakit.load_quantized(model_spec, method=args.quantize)
        print(qreport.summary())
    else:
        model, _ = load(model_spec)
    if is_adapter:
        lorakit.load_adapter(model, target)
    else:
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=_targets(args.targets)))
        print(f"(what a LoRA of r={args.r} on {args.targets} would add)")
    report = lorakit.parameter_report(model)
    print(json.dumps(report, indent=2) if args.json else lorakit.format_report(report, max_rows=args.rows))
    return 0


def _print_adapter(info: dict) -> None:
    cfg = info["config"]
    print(
        f"LoRA adapter: r={cfg.r} alpha={cfg.alpha} rslora={cfg.use_rslora} dora={cfg.use_dora} init={cfg.init} "
        f"bias={cfg.bias}" + (" lora_bias=True" if cfg.lora_bias else "")
    )
    bd = cfg.use_bdlora
    if bd:
        print(
            f"BD-LoRA: {bd.get('nblocks', 1)} blocks (A on {bd.get('target_modules_bd_a')}, B on "
            f"{bd.get('target_modules_bd_b')}); the file stores the blocks"
        )
    if cfg.use_kasa:
        print(
            f"KaSA: a learnable singular value per rank (lora_diag); W0 loses its r smallest singular components "
            f"(recomputed at load); regulariser beta={cfg.kasa_beta} gamma={cfg.kasa_gamma}"
        )
    print(f"targets: {cfg.targets}  base model: {cfg.base_model}")
    print(f"{'module':<52} {'r':>4} {'d':>6} {'k':>6} {'d·k':>10} {'stored':>9}")
    full = lora = 0
    for module, shapes in sorted(info["modules"].items()):
        r, k = shapes["lora_A"][0], _prod(shapes["lora_A"][1:])
        if bd and any(p in module for p in bd.get("target_modules_bd_a") or []):
            k *= int(bd.get("nblocks", 1))  # A's blocks: each reads in/N features
        d = shapes["lora_B"][0]
        stored = sum(_prod(shape) for shape in shapes.values())
        full, lora = full + d * k, lora + stored
        print(f"{module[-52:]:<52} {r:>4} {d:>6} {k:>6} {d * k:>10,} {stored:>9,}")
    for module, shapes in sorted(info.get("saved", {}).items()):
        n = sum(_prod(shape) for shape in shapes.values())
        what = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
        print(f"saved whole (modules_to_save): {module}: {n:,} parameters ({what})")
    for where, shapes in sorted(info.get("params", {}).items()):
        a, b = ("x".join(map(str, shapes[k])) for k in ("lora_A", "lora_B"))
        print(f"parameters (target_parameters {cfg.target_parameters}): {where}: lora_A {a}, lora_B {b}")
    ids = cfg.trainable_token_indices
    for module, shape in sorted(info.get("tokens", {}).items()):
        listed = (
            ids
            if isinstance(ids, list)
            else next((v for k, v in (ids or {}).items() if module.endswith(k)), [])
        )
        shown = ", ".join(map(str, listed[:8])) + (", ..." if len(listed) > 8 else "")
        print(
            f"token rows (trainable_token_indices): {module}: {shape[0]} rows x {shape[1]} (token ids {shown})"
        )
    print(
        f"{len(info['modules'])} modules, {info['parameters']:,} parameters in {info['tensors']} tensors; "
        f"adapted weights {full:,} -> {lora:,} ({full / max(lora, 1):.1f}x fewer)"
    )


def _format_gguf(info: dict, rows: int) -> str:
    lines = [
        f"{info['format']}: architecture {info['architecture']}, alpha {info['alpha']:g}",
        f"{'tensor':<40} {'r':>4} {'lora_a':>14} {'lora_b':>14} {'type':>6} {'scale':>8}",
    ]
    for name, row in list(info["modules"].items())[:rows]:
        a, b = "x".join(map(str, row["lora_a"])), "x".join(map(str, row["lora_b"]))
        lines.append(f"{name[-40:]:<40} {row['r']:>4} {a:>14} {b:>14} {row['type']:>6} {row['scale']:>8.4g}")
    if len(info["modules"]) > rows:
        lines.append(f"... {len(info['modules']) - rows} more (--rows)")
    lines.append(
        f"{len(info['modules'])} weights, {info['parameters']:,} parameters in {info['tensors']} tensors"
    )
    return "\n".join(lines)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _targets(spec: str) -> str | list[str]:
    return (
        spec
        if spec == "all-linear" or not spec.replace("_", "").replace(",", "").isalnum()
        else spec.split(",")
    )


def configure_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument("--device", default="cpu", help="where to merge: cpu (default), auto, cuda or cuda:N")
    add_allow_pickle(p)


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.export import merge_to_folder

    out = merge_to_folder(
        args.model, args.adapter, args.out, allow_pickle=args.allow_pickle, device=args.device
    )
    print(f"merged {args.adapter} into {args.model or 'the default model'}; wrote {out}")
    return 0


def configure_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuned", required=True, help="the fine-tuned model: a Hugging Face folder (safetensors)")
    p.add_argument("--model", help="its base: " + MODEL_HELP)
    p.add_argument("--out", required=True, help="output adapter folder (PEFT layout, written atomically)")
    p.add_argument(
        "-r", "--rank", type=positive_int, default=16, help="most rank a module gets (default: 16)"
    )
    p.add_argument(
        "--energy",
        type=float,
        help="lower each module's rank to the fewest singular values that keep this fraction of ‖ΔW‖², in (0, 1]",
    )
    p.add_argument(
        "--targets",
        help="the changed modules that get a LoRA: all-linear, names (q_proj,v_proj) or a regex (default: every "
        "changed weight, embeddings and the output head included)",
    )
    p.add_argument(
        "--no-copies", action="store_true", help="leave changed norms out instead of saving them whole"
    )
    p.add_argument(
        "--niter",
        type=int,
        help="a randomised SVD with this many power iterations (2 is usual): for large models, far faster",
    )
    p.add_argument(
        "--lora-bias",
        action="store_true",
        help="carry changed biases as each LoRA's own bias on B (PEFT's lora_bias), so that loading the adapter "
        "never changes the base (default: the biases are saved whole, bias=lora_only)",
    )


def cmd_extract(args: argparse.Namespace) -> int:
    from lorakit.extract import extract

    done = extract(
        args.model,
        args.tuned,
        args.out,
        r=args.rank,
        energy=args.energy,
        targets=None if args.targets is None else _targets(args.targets),
        copy_small=not args.no_copies,
        niter=args.niter,
        lora_bias=args.lora_bias,
        progress=True,
    )
    ranks = sorted({m.rank for m in done.loras})
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    print(f"{len(done.loras)} modules as LoRA ({span})" if done.loras else "no module as LoRA")
    if done.loras:
        worst = max(done.loras, key=lambda m: m.error)
        print(f"largest relative error ‖ΔW - B·A‖/‖ΔW‖: {worst.error:.3g} ({worst.module})")
    if done.copies:
        print(
            f"{len(done.copies)} modules saved whole: {', '.join(done.copies[:4])}{' …' if len(done.copies) > 4 else ''}"
        )
    if done.bias != "none":
        print(f"biases: {done.bias}")
    elif done.lora_bias:
        print("biases: as each LoRA's bias on B (lora_bias)")
    shown = list(done.left_out.items())[:8]
    for module, change in shown:
        print(f"left out: {module}, changed by ‖ΔW‖/‖W‖ = {change:.3g}")
    if len(done.left_out) > len(shown):
        print(f"left out: {len(done.left_out) - len(shown)} more (extract.json lists them)")
    share = 100 * done.parameters / max(done.base_parameters, 1)
    shown = f"{share:.2f}%" if share >= 0.01 else "under 0.01%"
    print(f"wrote {done.path}: {done.parameters:,} numbers, {shown} of the model's {done.base_parameters:,}")
    return 0


def configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder: DyLoRA (with --rank), or KaSA / BD-LoRA")
    p.add_argument(
        "--rank", type=int, help="DyLoRA: rank b of the exported adapter, 1..r_max (reads the adapter alone)"
    )
    p.add_argument(
        "--model",
        help="without --rank: the adapter's base, whose W0 a KaSA adapter's plain form needs: " + MODEL_HELP,
    )
    p.add_argument("--out", required=True, help="output adapter folder (written atomically)")


def cmd_convert(args: argparse.Namespace) -> int:
    if args.rank is not None:
        from lorakit.variants.dylora import export_rank

        out = export_rank(args.adapter, args.rank, args.out)
        print(f"wrote {args.adapter} at rank {args.rank} as a PEFT LoRA adapter: {out}")
        return 0
    import lorakit

    model, _ = load(args.model, "cpu", "float32")  # the SVD of KaSA's dropped part from the float32 weights
    name = lorakit.load_adapter(model, args.adapter)
    before = lorakit.describe_adapter(args.adapter)["config"]
    out = lorakit.save_adapter(model, args.out, name, plain=True)
    after = lorakit.describe_adapter(out)["config"]
    print(f"wrote {args.adapter} as a plain PEFT LoRA adapter of r={after.r} (was r={before.r}): {out}")
    return 0


def configure_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", help="adapter folders (PEFT layout) to combine")
    p.add_argument("--out", required=True, help="output adapter folder (written atomically)")
    p.add_argument(
        "--method",
        required=True,
        help="cat (exact), linear, svd, ties, dare_linear, dare_ties or magnitude_prune (docs/combine.md)",
    )
    p.add_argument(
        "--weights", type=float, nargs="+", help="one weight per adapter, may be negative (default: 1 each)"
    )
    p.add_argument(
        "--density", type=float, help="fraction of ΔW entries kept, in (0, 1]: ties, dare_*, magnitude_prune"
    )
    p.add_argument(
        "--svd-rank", type=int, help="rank after the SVD (default: the largest source rank per module)"
    )
    p.add_argument(
        "--majority-sign", default="total", help="TIES sign election: total (default) or frequency"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default: 0)")
    p.add_argument(
        "--allow-missing", action="store_true", help="a module missing from an adapter counts as ΔW = 0"
    )
    p.add_argument(
        "--ignore-base-model", action="store_true", help="combine adapters whose configs name different bases"
    )
    add_allow_pickle(p, several=True)


def cmd_combine(args: argparse.Namespace) -> int:
    from lorakit.combine import combine

    out = combine(
        args.adapters,
        args.weights,
        args.method,
        args.out,
        density=args.density,
        svd_rank=args.svd_rank,
        majority_sign_method=args.majority_sign,
        seed=args.seed,
        allow_missing=args.allow_missing,
        ignore_base_model=args.ignore_base_model,
        allow_pickle=args.allow_pickle,
    )
    print(f"combined {len(args.adapters)} adapters with {args.method}; wrote {out}")
    return 0


def configure_export(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = sub.add_parser(
        "gguf", help="llama.cpp's GGUF: a LoRA adapter file, or with --merged a whole model (docs/gguf.md)"
    )
    g.add_argument(
        "--adapter", help="adapter folder (PEFT layout); optional with --merged (then: the base alone)"
    )
    g.add_argument(
        "--out", required=True, help="the .gguf file to write (atomically), in a folder that exists"
    )
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument(
        "--merged",
        action="store_true",
        help="write the base with the adapter merged in, a model llama.cpp runs alone",
    )
    g.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default="f32",
        help="GGUF tensor type (default: f32)",
    )
    g.add_argument(
        "--no-modelfile", action="store_true", help="do not write an Ollama Modelfile beside --out"
    )
    add_allow_pickle(g)


def cmd_export(args: argparse.Namespace) -> int:
    from lorakit.ondevice import export_gguf

    done = export_gguf(
        args.out,
        args.adapter,
        model=args.model,
        merged=args.merged,
        outtype=args.outtype,
        modelfile=not args.no_modelfile,
        allow_pickle=args.allow_pickle,
        progress=True,
    )
    what = "model" if args.merged else "LoRA adapter"
    print(f"wrote {done.path}: a GGUF {what}, {done.tensors} tensors ({args.outtype})")
    if args.merged:
        print(f"run it: llama-cli -m {done.path}")
    else:
        print(f"run it: llama-cli -m BASE.gguf --lora {done.path}   (BASE: the model it was trained on)")
    if done.modelfile is not None:
        print(f"Ollama: ollama create NAME -f {done.modelfile}")
    return 0
