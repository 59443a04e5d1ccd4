"""The engine's model side: forward passes over the running batch, and each row's next token.

    runner = Runner(model, tokenizer, bank, prefixes, batch, stats, max_model_len=2048)
    runner.prefill(rows)    # the new rows' prompts after their cached starts; their cache joins the batch
    runner.decode(rows)     # one step for every running row: feed each row's last token

`lorakit.serve.engine` decides which rows run when; this computes them. Each forward routes row i to its own
adapter (`Row.adapter`, through `lorakit.serve.routing.route`), and each row's logits go to `Row.accept`, guarded
so that a row whose sampling, text or scoring raises fails alone. Everything here runs on the engine thread,
except `token_text` and `detokenize`, which any thread may call (one tokenizer call at a time: `tokenizer_lock`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from lorakit.bank import AdapterBank
from lorakit.head import plain_head
from lorakit.serve import kvcache
from lorakit.serve.batch import Batch
from lorakit.serve.prefill import prompt_key
from lorakit.serve.prefixes import PrefixCache
from lorakit.serve.requests import Done, Prompt, deliver, failure
from lorakit.serve.routing import route
from lorakit.serve.rows import Row, eos_ids
from lorakit.serve.scoring import keep_hidden, prompt_logprobs, row_logits
from lorakit.tying import base_module
from lorakit.variants.alora import row_sequences

log = logging.getLogger(__name__)


class Runner:
    def __init__(
        self,
        model,
        tokenizer,
        bank: AdapterBank,
        prefixes: PrefixCache,
        batch: Batch,
        stats: dict[str, int],
        *,
        max_model_len: int,
    ) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.prefixes, self.batch, self.stats, self.max_model_len = prefixes, batch, stats, max_model_len
        self.vocab_size = base_module(model.get_input_embeddings()).weight.shape[0]  # adapted or not
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_ids(model, tokenizer)
        # the server encodes on its threads, the engine decodes on this one: one tokenizer call at a time
        self.tokenizer_lock = threading.Lock()
        self._token_texts: dict[tuple[int, bool], str] = {}
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.head = plain_head(model) if self._keep_kw else None
        """The plain LM head that scores prompts a chunk of positions at a time from the last hidden states (None:
        from the logits of every position, for a head that is not plain or a model without logits_to_keep)."""

    @torch.no_grad()
    def prefill(self, rows: list[Row]) -> None:
        """Run the new rows' prompts (left-padded) and append their cache to the running batch's.

        Rows with the same prompt and adapter (the choices of one request with `n` > 1, or equal requests) are
        computed once: the forward runs over the distinct ones, and their cache and logits are copied to the rest."""
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault(prompt_key(r.adapter, r.req), len(distinct)) for r in rows]
        firsts = [rows[source.index(j)] for j in range(len(distinct))]
        scored = [r.req.params.prompt_logprobs is not None for r in rows]
        for j, score in zip(source, scored, strict=True):  # a prompt to score runs whole
            if score:
                firsts[j].prefix = None
        for r, j in zip(rows, source, strict=True):  # equal rows share their first's cached start
            r.prefix = firsts[j].prefix
        for r in rows:
            r.n_real = len(r.req.prompt_ids)
        # the tokens to run: each prompt after its cached start, if any, left-padded to a common length
        ids, mask, positions, cache = kvcache.prompt_inputs(
            [(r.req.prompt_ids, r.prefix.kv() if r.prefix else None) for r in firsts], self.pad_id
        )
        length = ids.shape[1]
        # prompts to score: with a plain LM head, from the last hidden states, a chunk of positions at a time;
        # else from the logits of every position of the batch
        head = self.head if any(scored) else None
        hidden: list[torch.Tensor] = []  # the hook's catch: the backbone's last hidden states
        hook = None if head is None else self.model.base_model.register_forward_hook(keep_hidden(hidden))
        try:
            logits = self.forward(
                [r.adapter for r in firsts],
                ids,
                mask,
                positions,
                cache,
                last_only=head is not None or not any(scored),
                sequences=lambda: [r.req.prompt_ids for r in firsts],
            )
        finally:
            if hook is not None:
                hook.remove()
        if self.prefixes.enabled:  # requests arriving while these run can share their prompts
            self.prefixes.remember_prompts(firsts, cache, mask)
        if logits.dim() == 2:  # (batch, vocab): the last positions only (or prompts of one token)
            logits = logits[:, None]
        if len(firsts) < len(rows):
            cache, mask = kvcache.select(cache, mask, source)
            logits = logits[torch.tensor(source)]  # every distinct row is kept: no column is trimmed
            hidden = [h[torch.tensor(source, device=h.device)] for h in hidden]
        self.stats["shared_prefills"] += len(rows) - len(firsts)
        self.stats["prompt_tokens"] += sum(r.n_real for r in rows)
        self.stats["cached_prompt_tokens"] += sum(r.reused for r in rows)
        self.batch.join(cache, mask, rows)
        self.stats["prefills"] += 1
        for i, r in enumerate(rows):
            if scored[i]:
                first = length - r.n_real  # the row's first position (after its left padding)
                plain = head is not None
                at = row_logits(
                    first, logits[i], hidden[0][i] if plain else None, head.weight if plain else None
                )
                if not self._score_guarded(r, at):
                    continue
            self._accept_guarded(r, logits[i, -1])

    @torch.no_grad()
    def decode(self, rows: list[Row]) -> None:
        """One decode step for every running row: feed each row's last token."""
        ids, mask, positions = self.batch.step_inputs()
        logits = self.forward(
            [r.adapter for r in rows],
            ids,
            mask,
            positions,
            self.batch.cache,
            last_only=False,
            sequences=lambda: [[*r.req.prompt_ids, *r.out_ids] for r in rows],  # ending with the token fed
        )
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for i, r in enumerate(rows):
            r.n_real += 1
            self._accept_guarded(r, logits[i])

    def forward(
        self,
        adapters: list[str | None],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        *,
        last_only: bool,
        sequences: Callable[[], Sequence[Sequence[int]]],
    ) -> torch.Tensor:
        """Logits of each row's last position, (batch, vocab), with its adapter (`adapters`); without `last_only`, of
        every position (batch, new tokens, vocab) when there is more than one.

        ids and positions are (batch, new tokens), mask (batch, cached + new tokens); `cache` grows in place.
        `sequences`: gives each row's tokens so far, ending with its last in `ids` (where aLoRA adapters find their
        invocation: lorakit.variants.alora.row_sequences); called only when an aLoRA adapter is loaded."""
        device = next(self.model.parameters()).device
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        with route(self.model, self.bank, adapters), row_sequences(self.model, sequences):
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **kwargs,
            )
        if last_only or ids.shape[1] == 1:
            return out.logits[:, -1].float().cpu()
        return out.logits.float().cpu()

    # -- tokens to text ----------------------------------------------------------------------------------------

    def _score_guarded(self, row: Row, logits_at: Callable[[int, int], torch.Tensor]) -> bool:
        """Send the row's prompt log-probabilities (`rows.prompt_logprobs`); False when the row is done: it asked
        for no tokens, or this failed (for this row alone)."""
        p = row.req.params
        try:
            deliver(row.req, Prompt(prompt_logprobs(row.req.prompt_ids, logits_at, p.prompt_logprobs or 0)))
        except Exception as e:  # noqa: BLE001 - one row's scoring must not fail the others
            log.exception("scoring a prompt failed")
            self.stats["errors"] += 1
            row.finish(failure(e))
            return False
        if p.max_tokens == 0:  # scored, nothing to generate
            row.finish(Done("length", row.n_real, 0))
            return False
        return True

    def _accept_guarded(self, row: Row, logits: torch.Tensor) -> None:
        """`Row.accept`; if it raises, this row alone fails (it leaves the batch at the next drop)."""
        try:
            row.accept(logits, self.detokenize, self.eos_ids, self.max_model_len)
            self.stats["generated_tokens"] += 1
        except Exception as e:  # noqa: BLE001 - one row's sampling or text must not fail the others
            log.exception("a row failed")
            self.stats["errors"] += 1
            if not row.finished:
                row.finish(failure(e))

    def token_text(self, token: int, *, special: bool = True) -> str:
        """A token's own text, remembered: special tokens as their text (for logprobs), or as "" with
        `special=False` (JSON mode's candidates). Any thread."""
        text = self._token_texts.get((token, special))
        if text is None:
            with self.tokenizer_lock:
                text = self.tokenizer.decode([token], skip_special_tokens=not special)
            self._token_texts[token, special] = text
        return text

    def detokenize(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
