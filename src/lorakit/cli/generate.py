"""`lorakit generate` and `lorakit eval`: the commands that run a model (with adapters) on text."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

from lorakit.cli.common import MODEL_HELP, add_allow_pickle, add_device, load
from lorakit.cliargs import non_negative, positive_int
from lorakit.errors import ConfigError


def configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--adapter", action="append", help="adapter folder (or a GGUF LoRA file); repeat to activate several"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    p.add_argument(
        "--arrow",
        type=positive_int,
        metavar="K",
        help="route each token to its K best of the --adapter folders (Arrow) instead of activating them all",
    )
    p.add_argument(
        "--arrow-temperature", type=float, default=1.0, help="softmax temperature of Arrow's mixing weights"
    )
    p.add_argument(
        "--general",
        action="append",
        help="with --arrow: a general adapter whose mean is subtracted from the routed ones (GenKnowSub); repeat",
    )
    add_device(p)
    add_allow_pickle(p, several=True)


def cmd_generate(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.generate import generate

    if (args.arrow is None) and args.general:
        raise ConfigError("--general is Arrow's (GenKnowSub): give --arrow K too")
    if args.arrow is not None and not args.adapter:
        raise ConfigError("--arrow K routes between adapters: give them with --adapter (repeat)")
    model, tok = load(args.model, args.device, args.dtype)
    for i, path in enumerate(args.adapter or []):
        lorakit.load_adapter(model, path, f"a{i}", allow_pickle=args.allow_pickle)
    for i, path in enumerate(args.general or []):
        lorakit.load_adapter(model, path, f"g{i}", allow_pickle=args.allow_pickle)
    routed = [f"a{i}" for i in range(len(args.adapter or []))]
    if args.arrow is None and len(routed) > 1:
        lorakit.set_active(model, routed)
    general = [f"g{i}" for i in range(len(args.general or []))]
    routing = (
        lorakit.arrow(model, routed, top_k=args.arrow, temperature=args.arrow_temperature, general=general)
        if args.arrow is not None
        else nullcontext()
    )
    with routing:
        text = generate(
            model,
            tok,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            chat=not args.no_chat,
            temperature=args.temperature,
        )
    print(text)
    return 0


def configure_eval(p: argparse.ArgumentParser) -> None:
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        help="data file: JSONL, a JSON array, CSV/TSV, Parquet or Arrow, or a datasets folder "
        "(save_to_disk's), of {prompt,completion}, {messages} or {text} records, or Alpaca's or ShareGPT's "
        "(docs/data.md); or of preference pairs (docs/dpo.md): then an adapter's implicit rewards are "
        "measured too",
    )
    data.add_argument(
        "--task",
        help="a built-in task's held-out examples (as lorakit train holds them out: 'dates'; of an embedding "
        "model's adapter, 'dates-scored' too: scored pairs, --limit dates of 3 pairs each)",
    )
    p.add_argument(
        "--fields",
        type=_fields,
        default={},
        metavar="MAPPING",
        help="with --data: the file's column names for lorakit's keys, e.g. '{prompt: question, completion: answer}'",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--adapter", help="adapter folder (PEFT layout) or a GGUF LoRA file")
    p.add_argument(
        "--compare-base",
        action="store_true",
        help="with --adapter: also evaluate the base model alone, on the same examples",
    )
    p.add_argument(
        "--max-len", type=positive_int, default=256, help="maximum tokens per example (default: 256)"
    )
    p.add_argument(
        "--limit", type=positive_int, default=100, help="examples generated for accuracy (default: 100)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument(
        "--objective",
        choices=(
            "dpo",
            "simpo",
            "orpo",
            "cpo",
            "kto",
            "reward",
            "classify",
            "regression",
            "token_classify",
            "embed",
        ),
        default=None,
        help="with a --data file of preference pairs: the preference loss and rewards to measure: dpo (the "
        "adapter's against the base, the default), simpo, orpo or cpo (no reference: the base's too); kto: "
        "of a file of answers labelled desirable or not (or of pairs), the adapter's against the base; reward: "
        "a reward model's --adapter (chosen automatically for one), on --data's pairs or --task's; classify: a "
        "classifier's --adapter (chosen automatically too), on --data's labelled texts or --task's; regression: a "
        "regression's --adapter (chosen automatically too), on --data's texts labelled with numbers or --task's; "
        "token_classify: a token classifier's --adapter (chosen automatically too), on --data's tagged texts or "
        "--task's; embed: an embedding model's --adapter (chosen automatically too), how well each anchor of --data "
        "(or --task) finds its positive",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="with --objective: its beta (ORPO's lambda), for the rewards and the loss (default: the objective's, "
        "as lorakit train's: dpo 0.1, simpo 2, orpo 0.1, cpo 0.1, kto 0.1)",
    )
    p.add_argument(
        "--dimensions",
        type=positive_int,
        action="append",
        metavar="N",
        help="an embedding model's --adapter: also measure its vectors cut to their first N dimensions "
        "(renormalized, as /v1/embeddings' dimensions; embed.matryoshka_dims trains for it); repeat for more",
    )
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_device(p)
    add_allow_pickle(p)


def _fields(text: str) -> dict[str, str]:
    """--fields: a YAML (or JSON) mapping of lorakit's keys to column names."""
    from lorakit.data.shapes import parse_fields

    try:
        return parse_fields(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import lorakit
    from lorakit.cli.classify import eval_classifier, eval_regression
    from lorakit.cli.embed import embedding_adapter, eval_embedder
    from lorakit.cli.reward import classifier_adapter, eval_reward
    from lorakit.cli.tagging import eval_tagger, tagger_adapter
    from lorakit.data.feedback import encode_feedback, read_feedback
    from lorakit.data.preference import encode_pairs, read_any
    from lorakit.data.tasks import make_task
    from lorakit.data.tokenize import encode_dataset
    from lorakit.errors import ConfigError
    from lorakit.formats import adapter_problem
    from lorakit.train.config import DataSection, RunConfig, TrainSection
    from lorakit.train.evaluate import eval_loss, exact_match, preference_eval
    from lorakit.train.objectives import NAMES, REFERENCE_OBJECTIVES, make_objective

    if args.compare_base and not args.adapter:
        raise ConfigError("--compare-base compares an adapter with its base: give --adapter too")
    pooling = embedding_adapter(args)
    if pooling is not None:  # an embedding model's adapter
        return eval_embedder(args, pooling)
    if args.dimensions:
        raise ConfigError("--dimensions measures an embedding model's vectors: give --adapter with one")
    tags = tagger_adapter(args)
    if tags is not None:  # a token classifier's adapter
        return eval_tagger(args, tags)
    labels = classifier_adapter(args)
    if labels is not None:  # a reward model's, a classifier's or a regression's adapter: it generates nothing
        if labels == 1 and adapter_problem(args.adapter) == "regression":
            return eval_regression(args)
        return eval_reward(args, labels) if labels == 1 else eval_classifier(args, labels)
    # a task: the held-out examples `lorakit train` evaluates on (seed 0, generated first)
    if args.fields and not args.data:
        raise ConfigError("--fields names the columns of a --data file: give --data too")
    if args.beta is not None and not args.beta > 0:
        raise ConfigError(f"--beta must be > 0, got {args.beta}")
    # pairs: loss and accuracy of the chosen answers; KTO's feedback: of the desirable ones
    kto = args.objective == "kto"
    if kto:
        if not args.data:
            raise ConfigError(
                "--objective kto measures answers labelled desirable or not: give a --data file of them (or of "
                "pairs)"
            )
        items, pairs = read_feedback(args.data, args.fields), True
        examples = [f["example"] for f in items if f["desirable"]]
    else:
        items, pairs = (
            read_any(args.data, args.fields)
            if args.data
            else (make_task(args.task, n_train=0, n_eval=args.limit)[1], False)
        )
        examples = [p["chosen"] for p in items] if pairs else items
    if (args.objective or args.beta is not None) and not pairs:
        raise ConfigError("--objective and --beta measure preference pairs: give a --data file of pairs")
    name = args.objective or "dpo"
    model, tok = load(args.model, args.device, args.dtype)
    rows, stats = encode_dataset(tok, examples, max_len=args.max_len, chat=not args.no_chat)
    report = {"examples": len(rows), "truncated": stats["truncated"], "max_len": args.max_len}
    if pairs:
        encode = encode_feedback if kto else encode_pairs
        pair_rows, _ = encode(tok, items, max_len=args.max_len, chat=not args.no_chat)
        cfg = RunConfig(train=TrainSection(objective=name), data=DataSection(max_len=args.max_len))
        if args.beta is not None:
            getattr(cfg, name).beta = args.beta
        objective = make_objective(cfg)
        beta = getattr(cfg, name).beta
        report.update({"answers" if kto else "pairs": len(pair_rows), "objective": name, "beta": beta})

    def measure(label: str) -> dict:
        loss = eval_loss(model, rows, tok.pad_token_id)
        acc, samples = exact_match(
            model, tok, examples[: args.limit], max_new_tokens=args.max_new_tokens, chat=not args.no_chat
        )
        report[label] = {
            "loss": loss,
            "accuracy": acc,
            "accuracy_examples": len(samples),
            "samples": samples[:3],
        }
        # DPO and KTO: the adapter against the base as reference
        if pairs and (label == "adapter" or name not in REFERENCE_OBJECTIVES):
            report[label].update(
                {
                    f"preference_{k}": v
                    for k, v in preference_eval(model, pair_rows, tok.pad_token_id, objective).items()
                }
            )
        return report[label]

    if not args.adapter or args.compare_base:
        measure("base")
    if args.adapter:
        lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
        measure("adapter")
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{len(rows)} examples ({stats['truncated']} truncated to {args.max_len} tokens)")
    if kto:
        print(f"{len(pair_rows)} rated answers: the loss and accuracy below are of the desirable ones")
    elif pairs:
        print(f"{len(pair_rows)} preference pairs: the loss and accuracy below are of the chosen answers")
    for label in ("base", "adapter"):
        if label not in report:
            continue
        m, who = report[label], f"{label}: " if args.compare_base else ""
        print(
            f"{who}eval loss: {m['loss']:.4f}"
            if m["loss"] is not None
            else f"{who}eval loss: n/a (no example has a token left to evaluate after truncation to "
            f"{args.max_len} tokens)"
        )
        if m["accuracy"] is not None:
            print(
                f"{who}exact-match accuracy: {100 * m['accuracy']:.1f}% on {m['accuracy_examples']} examples"
            )
            for s in m["samples"]:
                print(f"  expected {s['expected']!r}, got {s['got']!r}")
        if "preference_kl" in m:  # KTO: a reward is right on its label's side of the reference point beta z
            print(
                f"{who}reward accuracy: {100 * m['preference_reward_accuracy']:.1f}% on their label's side "
                f"(margin {m['preference_reward_margin']:.3f}, KL estimate {m['preference_kl']:.4f}), KTO loss "
                f"{m['preference_loss']:.4f} at beta {beta:g}"
            )
        elif "preference_reward_accuracy" in m:
            print(
                f"{who}reward accuracy: {100 * m['preference_reward_accuracy']:.1f}% (margin "
                f"{m['preference_reward_margin']:.3f}), {NAMES[name]} loss {m['preference_loss']:.4f} at beta {beta:g}"
            )
    return 0
