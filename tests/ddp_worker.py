"""Run by test_ddp.py, alone or under torchrun: train a tiny model a few steps and save the adapter (rank 0).

Arguments: the output folder, and the variants ("all", or names separated by commas), each trained in turn into a
folder of its own, in one process group (the processes start once). One process accumulates two micro-batches,
each of two processes takes one. The variants: "lora"; "kasa": its regulariser joins the loss; "dpo": the rows are
preference pairs and the loss DPO's, its reference the base with the adapters off; "orpo": the same pairs, ORPO's
loss, no reference; "kto": the rows alone, every other one desirable, KTO's loss and KL estimate; "reward": the
pairs, on the tiny model with a one-output head, a reward model's loss; "classify": the rows labelled one of 3
classes, on the tiny model with a 3-output head; "weighted": the same, with class weights; "regression": the rows
labelled with numbers, on the tiny model with a one-output head; "multi": each row labelled with a set of the 3
classes (multi-label), with class weights; "tokens": each row's tokens tagged one of 3 tags (the first untagged;
every row has as many tagged tokens, as SFT's rows have learned ones), on the tiny model as a token classifier;
"embed": each row split into an anchor and its positive, every other one with a hard negative, on the tiny model's
body (a bare LlamaModel) as an embedding model: each micro-batch is its own pool of negatives, on one process as on
two; "embed_gather": the same rows (every third with a hard negative, so that processes hold unequally many) with
embed.gather and embed.symmetric, two processes of 2 rows each against one process taking the 4 as one batch (one
pool of all 4 rows' positives and negatives, exact gradients); "stop": train.early_stop 1 on rank 0's evaluations,
scripted to rise at step 3, so that each process must stop there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import lorakit  # noqa: E402
from lorakit.data.feedback import Feedback  # noqa: E402
from lorakit.data.labels import Labelled  # noqa: E402
from lorakit.data.preference import Pair  # noqa: E402
from lorakit.data.tagging import Tagged  # noqa: E402
from lorakit.data.tokenize import IGNORE, Encoded  # noqa: E402
from lorakit.train.best import Best  # noqa: E402
from lorakit.train.config import RunConfig, TrainSection  # noqa: E402
from lorakit.train.distributed import finish_distributed, init_distributed  # noqa: E402
from lorakit.train.loop import train_loop  # noqa: E402
from lorakit.train.objectives import make_objective  # noqa: E402

from tiny import tiny_llama  # noqa: E402


def run(variant: str, out: Path, world: int, rank: int) -> None:
    """Train `variant` 4 steps into `out` (rank 0 saves the adapter): one process accumulates two micro-batches
    (embed_gather: takes the 4 rows as one batch), each of two processes takes one."""
    out.mkdir(parents=True, exist_ok=True)
    accum = 1 if world > 1 or variant == "embed_gather" else 2
    torch.manual_seed(0)
    model = tiny_llama()
    HEADS = {"reward": 1, "classify": 3, "weighted": 3, "regression": 1, "multi": 3}
    if variant == "tokens":  # the same body with a head on every token (its own init, same seed), no head dropout
        from transformers import LlamaForTokenClassification

        model.config.num_labels, model.config.classifier_dropout = 3, 0.0
        torch.manual_seed(0)
        model = LlamaForTokenClassification(model.config)
    if variant in ("embed", "embed_gather"):  # the body alone (a bare LlamaModel), mean-pooled
        from lorakit.task_types import mark_embedder

        model = model.model
        mark_embedder(model, "mean")
    if variant in HEADS:  # the same body with a head of 1 or 3 outputs (its own init, same seed)
        from transformers import LlamaForSequenceClassification

        model.config.num_labels, model.config.pad_token_id = HEADS[variant], 0
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(model.config)
    # KaSA's regulariser weighted 0.1 (not 1e-4/1e-3): large beside the task loss, so that a mistake in adding it shows
    kasa = {"use_kasa": True, "kasa_beta": 0.1, "kasa_gamma": 0.1} if variant == "kasa" else {}
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", **kasa))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        ids = torch.randint(0, 128, (10,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE] * 3 + ids[3:]))
    pairs = variant in ("dpo", "orpo", "reward")
    if pairs:  # each row against the next one, on the same 3-token prompt
        rows = [
            Pair(a, Encoded(a.input_ids[:3] + b.input_ids[3:], a.labels[:3] + b.labels[3:]))
            for a, b in zip(rows, rows[1:] + rows[:1], strict=True)
        ]
    if variant == "kto":  # each micro-batch's KL estimate from its own rows: the same on one process and on two
        rows = [Feedback(r, i % 2 == 0) for i, r in enumerate(rows)]
    if variant in ("classify", "weighted"):  # each row labelled one of 3 classes
        rows = [Labelled(r, i % 3) for i, r in enumerate(rows)]
    if variant == "regression":  # each row labelled with a number
        rows = [Labelled(r, (i % 5) / 2 - 1) for i, r in enumerate(rows)]
    if variant == "multi":  # each row labelled with a set of classes, some empty
        rows = [Labelled(r, tuple(c for c in range(3) if (i >> c) & 1)) for i, r in enumerate(rows)]
    if variant == "tokens":  # each token but the first tagged
        rows = [
            Tagged(Encoded(r.input_ids, [IGNORE] + [(i + t) % 3 for t in range(1, 10)]), "", [], [])
            for i, r in enumerate(rows)
        ]
    if variant in ("embed", "embed_gather"):  # the first 5 tokens the anchor, the rest its positive; every other
        # row a hard negative
        from lorakit.train.embed_objective import TextPair

        hard = (lambda i: i % 3 == 0) if variant == "embed_gather" else (lambda i: i % 2)  # gather: processes
        rows = [  # holding unequally many negatives
            TextPair(r.input_ids[:5], r.input_ids[5:], r.input_ids[2:8] if hard(i) else None) for i, r in enumerate(rows)
        ]
        if variant == "embed_gather" and world > 1:  # say how many candidates each process's pools held
            import lorakit.train.embed_objective as eo

            real_gather = eo.gather_rows

            def counting(x):
                every, at = real_gather(x)
                (out / f"sizes-{rank}.txt").open("a").write(f"{x.shape[0]} of {every.shape[0]}\n")
                return every, at

            eo.gather_rows = counting
    embed = variant in ("embed", "embed_gather")
    preference = pairs or embed or variant in ("kto", "classify", "weighted", "regression", "multi", "tokens")
    cfg = RunConfig(  # its lora section is the default: the loop adds KaSA's regulariser because the model has it
        train=TrainSection(
            out_dir=str(out), steps=4, batch_size=4 if variant == "embed_gather" and world == 1 else 2,
            grad_accum=accum, lr=1e-2, warmup_steps=1, save_every=0,
            objective=(
                {"weighted": "classify", "multi": "classify", "tokens": "token_classify", "embed_gather": "embed"}.get(
                    variant, variant
                )
                if preference
                else "sft"
            ),
            fused=not preference,  # preferences under DDP take the model's logits; so does the one process held to them
        )
    )
    evaluate, best = None, None
    if variant == "stop":  # only rank 0 evaluates (as run_training under DDP): the others learn its decision
        losses = iter([3.0, 2.0, 2.5])
        evaluate = (lambda: {"loss": next(losses)}) if rank == 0 else None
        cfg.train.eval_every, cfg.train.early_stop = 1, 1
        best = Best(cfg.train)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    objective = make_objective(cfg)
    if embed:
        objective.pooling = "mean"
        objective.gather = objective.symmetric = variant == "embed_gather"  # symmetric: the anchors gathered too
    if variant == "weighted":  # weights unlike the batch's shares, so that a normalisation per process would show
        objective.class_weights = [0.5, 2.0, 4.0]
    if variant == "multi":  # with each class's positives weighted (pos_weight), unlike the batch's shares
        objective.num_labels, objective.multi_label, objective.class_weights = 3, True, [0.5, 2.0, 4.0]
    try:
        result = train_loop(
            trained, rows, cfg, pad_id=0, out_dir=out, world=world, rank=rank, objective=objective,
            evaluate=evaluate, best=best,
        )
    finally:
        if variant == "embed_gather" and world > 1:
            eo.gather_rows = real_gather
    (out / f"steps-{rank}.txt").write_text(str(result["steps"]))
    if rank == 0:
        save_file(lorakit.adapter_state_dict(model), str(out / "adapter.safetensors"))


VARIANTS = ["lora", "kasa", "dpo", "orpo", "kto", "stop", "reward", "classify", "weighted", "regression", "multi"]
VARIANTS += ["tokens", "embed", "embed_gather"]

if __name__ == "__main__":
    torch.set_num_threads(1)
    world, rank = init_distributed()
    for name in VARIANTS if sys.argv[2] == "all" else sys.argv[2].split(","):
        run(name, Path(sys.argv[1]) / name, world, rank)
    finish_distributed()
