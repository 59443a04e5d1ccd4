"""An embedding model's objective (`train.objective embed`): in-batch contrastive learning on texts and the texts
that belong with them, sentence-transformers' MultipleNegativesRankingLoss (InfoNCE).

Each micro-batch's anchors, positives and hard negatives (where the data has them) go through the model a column at
a time, each column padded to its own longest text (under DDP, whose gradient sync takes one forward per step, in
one batch); each text is pooled (`lorakit.embeddings.pool`) and L2-normalized. Anchor i's scores are its cosine
similarities, times `embed.scale`, to every positive and negative of the micro-batch; the loss is the
cross-entropy of finding its own positive among them. With `embed.symmetric`, the mean with each positive finding
its anchor among the anchors. The other rows are the negatives, so the micro-batch is the pool: gradient
accumulation does not widen it. With `embed.chunk_size`, a column is embedded a chunk of rows at a time under a
checkpoint (sentence-transformers' CachedMultipleNegativesRankingLoss, GradCache): a large micro-batch, a large
pool, in the activation memory of one chunk, for a second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.embeddings import default_pooling, embed_batch, embed_rows, encode_texts
from lorakit.errors import ConfigError
from lorakit.task_types import mark_embedder
from lorakit.train.correlation import pearson, ranks
from lorakit.train.distributed import gather_rows
from lorakit.train.objective_base import Objective

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


@dataclass
class TextPair:
    """One tokenized embedding example: the anchor's token ids, its positive's, and a hard negative's (or None)."""

    anchor: list[int]
    positive: list[int]
    negative: list[int] | None = None
    truncated: bool = False
    score: float | None = None
    """A scored pair's similarity (higher: more alike; CoSENT orders the pairs by it), None for a pair that belongs
    together."""


def choose_pooling(setting: str, model: nn.Module, say) -> str:
    """An embedding model's pooling (embed.pooling `setting`, or with auto the model's own: `default_pooling`),
    marked on the model so that its adapter is saved as PEFT's FEATURE_EXTRACTION with the pooling recorded;
    ConfigError for a model folder whose pooling lorakit does not compute."""
    pooling = setting
    if pooling == "auto":
        try:
            pooling = default_pooling(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mark_embedder(model, pooling)
    say(f"embedding: {pooling} pooling of the last hidden states, L2-normalized")
    return pooling


def cut(vectors: torch.Tensor, width: int | None) -> torch.Tensor:
    """Normalized `vectors` cut to their first `width` dimensions and normalized again (as /v1/embeddings'
    dimensions and sentence-transformers' truncate_dim); None: as they are."""
    return vectors if width is None else F.normalize(vectors[:, :width], dim=-1)


def matryoshka_pairs(dims: list[int], weights: list[float]) -> list[tuple[int, float]]:
    """embed.matryoshka_dims with their weights (1 each where none are given), widest first, as
    sentence-transformers' MatryoshkaLoss sums them; [] without Matryoshka training."""
    return sorted(zip(dims, weights or [1.0] * len(dims), strict=True), key=lambda dw: -dw[0])


def encode_text_pairs(tokenizer, items: list[dict], max_len: int) -> list[TextPair]:
    """`lorakit.data.textpairs` records as `TextPair`s: each text tokenized as the tokenizer does by itself
    (`lorakit.embeddings.encode_texts`: cut to `max_len` tokens, its own special tokens kept), marked truncated
    where one of its texts was cut."""
    texts = [t for it in items for t in (it["anchor"], it["positive"], it["negative"]) if t is not None]
    ids = iter(encode_texts(tokenizer, texts, max_len))
    too_long = iter(len(x) > max_len for x in tokenizer(texts)["input_ids"])
    rows = []
    for it in items:
        n = 2 if it["negative"] is None else 3
        texts = [next(ids) for _ in range(n)]
        rows.append(
            TextPair(*texts, truncated=any([next(too_long) for _ in range(n)]), score=it.get("score"))
        )
    return rows


def _row(ids: list[int]) -> Encoded:
    return Encoded(list(ids), [IGNORE] * len(ids))


class EmbedObjective(Objective):
    """In-batch contrastive loss of an embedding model (a bare transformers model, AutoModel) on `TextPair` rows."""

    name = "embed"
    rows = "text_pairs"
    generates = False

    def __init__(self, cfg: RunConfig) -> None:
        self.scale = cfg.embed.scale
        self.symmetric = cfg.embed.symmetric
        self.chunk_size = cfg.embed.chunk_size
        self.matryoshka = matryoshka_pairs(cfg.embed.matryoshka_dims, cfg.embed.matryoshka_weights)
        self.gather = cfg.embed.gather
        self.pooling = None  # set by `attach` once the model is loaded (embed.pooling, or the model's own)
        self.width = None  # the model's vectors' width, set by `attach`

    def attach(self, model: nn.Module, pooling: str, say) -> None:
        """Set the pooling (`choose_pooling` of embed.pooling `pooling`) and the vectors' width from the loaded
        `model`; ConfigError for embed.matryoshka_dims wider than the model's vectors."""
        self.pooling = choose_pooling(pooling, model, say)
        self.width = model.get_input_embeddings().embedding_dim
        wider = [d for d, _ in self.matryoshka if d > self.width]
        if wider:
            raise ConfigError(
                f"embed.matryoshka_dims {wider} are wider than the model's {self.width}-dimensional vectors"
            )
        if self.matryoshka:
            say(
                f"matryoshka: the loss summed over the vectors cut to {[d for d, _ in self.matryoshka]} dimensions"
            )

    @property
    def cut_dims(self) -> list[int]:
        """The Matryoshka dimensions narrower than the model's vectors, which evaluation measures apart."""
        return [d for d, _ in self.matryoshka if self.width is None or d < self.width]

    def encoded(self, rows: list[TextPair]) -> list[Encoded]:
        """The anchors, then the positives, then the hard negatives that the rows have (collated into one batch,
        whose columns `loss` embeds each at its own width)."""
        return [
            *(_row(r.anchor) for r in rows),
            *(_row(r.positive) for r in rows),
            *(_row(r.negative) for r in rows if r.negative is not None),
        ]

    def token_rows(self, rows: list[TextPair]) -> list[Encoded]:
        return self.encoded(rows)

    def extras(self, rows: list[TextPair]) -> dict[str, torch.Tensor]:
        out = {"pairs": torch.tensor(len(rows))}
        if rows and rows[0].score is not None:  # scored pairs (a file is all scored or none)
            out["scores"] = torch.tensor([r.score for r in rows], dtype=torch.float32)
        return out

    def vectors(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The normalized embeddings of the batch's anchors, then its positives, then its hard negatives."""
        total = batch["input_ids"].shape[0]
        if isinstance(model, DistributedDataParallel):  # DDP syncs the gradients of one forward per step
            if self.chunk_size:
                raise ConfigError(
                    "embed.chunk_size does not work under DDP (its gradient sync takes one forward per step); "
                    "use one process, or embed.chunk_size 0"
                )
            return self._embed(model, batch, slice(0, total))
        n, step = int(batch["pairs"]), self.chunk_size or total
        parts = [
            slice(start, min(start + step, group.stop))
            for group in (slice(0, n), slice(n, 2 * n), slice(2 * n, total))
            for start in range(group.start, group.stop, step)
        ]
        return torch.cat([self._chunk(model, batch, rows) for rows in parts])

    def _chunk(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """`_embed` of `rows`; with `embed.chunk_size`, through a checkpoint: only the vectors are kept, and the
        backward computes the chunk's forward again (GradCache: the loss and gradients of the whole batch, with
        one chunk's activations in memory at a time)."""
        if not self.chunk_size or not torch.is_grad_enabled():
            return self._embed(model, batch, rows)
        return checkpoint(self._embed, model, batch, rows, use_reentrant=False)

    def _embed(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """The embeddings of one column's rows (the anchors, the positives or the negatives), cut to their own
        longest row: short anchors are not padded to the documents' length."""
        mask = batch["attention_mask"][rows]
        width = int(mask.sum(-1).max())
        return embed_batch(model, batch["input_ids"][rows, :width], mask[:, :width], self.pooling)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        vectors, n = self.vectors(model, batch), int(batch["pairs"])
        widths = self.matryoshka or [(None, 1.0)]  # (the width the vectors are cut to, its loss's weight)
        if "scores" in batch:  # scored pairs: CoSENT
            first, second, scores = vectors[:n], vectors[n : 2 * n], batch["scores"]
            return sum(w * cosent(cut(first, d), cut(second, d), scores, self.scale) for d, w in widths), {}
        anchors, candidates = vectors[:n], vectors[n:]  # candidates: the positives, then the hard negatives
        pool, pool_anchors, at, anchors_at = candidates, anchors, 0, 0
        if self.gather and isinstance(model, DistributedDataParallel):  # every process's candidates
            pool, at = gather_rows(candidates)
            if self.symmetric:
                pool_anchors, anchors_at = gather_rows(anchors)
        target = torch.arange(n, device=vectors.device)

        def part(d: int | None) -> torch.Tensor:
            a, c, aa = cut(anchors, d), cut(pool, d), cut(pool_anchors, d)
            # anchor i's positive: the pool's row at + i
            forward = F.cross_entropy(self.scale * a @ c.T, at + target)
            if not self.symmetric:
                return forward
            return (forward + F.cross_entropy(self.scale * c[at : at + n] @ aa.T, anchors_at + target)) / 2

        right = (anchors @ pool.T).detach().argmax(-1) == at + target  # the full vectors
        return sum(w * part(d) for d, w in widths), {"accuracy": float(right.float().mean())}


@torch.no_grad()
def retrieval_measures(
    model: nn.Module,
    rows: list[TextPair],
    pad_id: int | None,
    pooling: str,
    scale: float,
    dims: list[int] | tuple[int, ...] = (),
) -> dict[str, float]:
    """How well each anchor of `rows` finds its positive among all their positives and negatives (each distinct
    text once, as sentence-transformers' InformationRetrievalEvaluator ranks a corpus), by cosine similarity:
    `accuracy` (the positive ranked first), `recall_at_10`, `mrr_at_10` (the mean of 1 / its rank, 0 past 10), and
    `loss`, the contrastive loss of the whole set as one batch (`scale` on the similarities). For each of `dims`,
    the same of the vectors cut to their first `d` dimensions (renormalized), as `dim{d}_accuracy` and so on."""
    was_training = model.training
    model.eval()
    try:
        anchors = embed_rows(model, [r.anchor for r in rows], pad_id, pooling)
        corpus: dict[tuple[int, ...], int] = {}
        for r in rows:
            for ids in (r.positive, r.negative):
                if ids is not None:
                    corpus.setdefault(tuple(ids), len(corpus))
        candidates = embed_rows(model, [list(k) for k in corpus], pad_id, pooling)
    finally:
        model.train(was_training)
    target = torch.tensor([corpus[tuple(r.positive)] for r in rows], device=anchors.device)
    out = _ranked(anchors, candidates, target, scale)
    for d in dims:
        measured = _ranked(cut(anchors, d), cut(candidates, d), target, scale)
        out.update({f"dim{d}_{k}": v for k, v in measured.items()})
    return out


def cosent(
    anchors: torch.Tensor, positives: torch.Tensor, scores: torch.Tensor, scale: float
) -> torch.Tensor:
    """CoSENT's loss of scored pairs (sentence-transformers' CoSENTLoss): log(1 + the sum, over every two pairs i, j
    with scores[i] < scores[j], of exp(scale * (cos_i - cos_j))), so that the pairs' cosine similarities come in the
    order of their scores. `anchors`, `positives`: normalized vectors, one row per pair."""
    cos = scale * (anchors * positives).sum(-1)
    gaps = cos[:, None] - cos[None, :]  # cos_i - cos_j
    wrong_way = (scores[:, None] < scores[None, :]).to(gaps.dtype)
    gaps = gaps - (1 - wrong_way) * 1e12  # only the pairs scored lower than another count
    return torch.logsumexp(torch.cat([gaps.new_zeros(1), gaps.flatten()]), dim=0)


def embedding_measures(
    model: nn.Module,
    rows: list[TextPair],
    pad_id: int | None,
    pooling: str,
    scale: float,
    dims: list[int] | tuple[int, ...] = (),
) -> dict[str, float]:
    """`similarity_measures` of scored pairs, else `retrieval_measures`."""
    measure = similarity_measures if rows and rows[0].score is not None else retrieval_measures
    return measure(model, rows, pad_id, pooling, scale, dims)


@torch.no_grad()
def similarity_measures(
    model: nn.Module,
    rows: list[TextPair],
    pad_id: int | None,
    pooling: str,
    scale: float,
    dims: list[int] | tuple[int, ...] = (),
) -> dict[str, float]:
    """How well the cosine similarity of each scored pair of `rows` follows its score (as sentence-transformers'
    EmbeddingSimilarityEvaluator): `pearson` and `spearman` (the correlation of their ranks), and `loss`, the
    CoSENT loss of the whole set as one batch (`scale`). For each of `dims`, the same of the vectors cut to their
    first `d` dimensions, as `dim{d}_spearman` and so on."""
    was_training = model.training
    model.eval()
    try:
        anchors = embed_rows(model, [r.anchor for r in rows], pad_id, pooling)
        positives = embed_rows(model, [r.positive for r in rows], pad_id, pooling)
    finally:
        model.train(was_training)
    gold = torch.tensor([r.score for r in rows], dtype=torch.float64)
    out: dict[str, float] = {}
    for d in (None, *dims):
        a, p = cut(anchors, d), cut(positives, d)
        cos = (a * p).sum(-1).double().cpu()
        measured = {
            "loss": float(cosent(a, p, gold.to(a.device, torch.float32), scale)),
            "pearson": pearson(cos, gold),
            "spearman": pearson(ranks(cos), ranks(gold)),
        }
        out.update({(k if d is None else f"dim{d}_{k}"): v for k, v in measured.items()})
    return out


def measured_widths(measures: dict) -> list[int]:
    """The widths that `retrieval_measures` or `similarity_measures` measured apart in `measures` (their `dim{d}_`
    keys), widest first."""
    return sorted({int(k[3:].split("_")[0]) for k in measures if k.startswith("dim")}, reverse=True)


def _ranked(anchors: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor, scale: float) -> dict:
    """retrieval_measures' four measures of normalized `anchors` searching `candidates` (`target`: each anchor's
    positive's row)."""
    scores = anchors @ candidates.T
    rank = (scores > scores.gather(1, target[:, None])).sum(1)  # 0: ranked first
    first10 = rank < 10
    return {
        "loss": float(F.cross_entropy(scale * scores, target)),
        "accuracy": float((rank == 0).float().mean()),
        "recall_at_10": float(first10.float().mean()),
        "mrr_at_10": float(torch.where(first10, 1.0 / (rank + 1).float(), 0.0).mean()),
    }
