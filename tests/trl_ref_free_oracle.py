"""TRL's ORPOTrainer and CPOTrainer (SimPO, CPO) of trl 1.16.0 (``trl.experimental``) on a PEFT LoRA adapter,
as the oracle for lorakit's reference-free preference objectives.

`trl_ref_free` trains a saved PEFT adapter with TRL for `steps` optimizer steps, each on ALL pairs as one batch,
and returns TRL's per-step logs and the trained adapter. What follows was read in trl/experimental/orpo/
orpo_trainer.py and trl/experimental/cpo/cpo_trainer.py of trl 1.16.0.

* Tokenization: these two trainers keep TRL's older tokenizer (``tokenize_row``), which adds a BOS where the
  tokenizer has one and an EOS after every answer, and refuses lists of messages. DPOTrainer's tokenization is
  the one lorakit matches (tests/test_dpo_trl.py checks it), so the oracle hands both trainers lorakit's token ids:
  ``tokenize_row`` is replaced by one that returns the given prompt, chosen and rejected ids, with the labels -100
  on the prompt. Everything after it (collation, padding, forward, log-probabilities, losses, optimizer) is TRL's.
* Log-probabilities: ``get_batch_logps(..., average_log_prob=True)``, each answer's MEAN token log-probability
  ℓ (ORPO always; CPO for loss_type "simpo" and "ipo"); otherwise (CPO's "sigmoid" and "hinge") the SUM L.
* SimPO (CPOTrainer, loss_type "simpo"): per pair -logsigmoid(beta (ℓc - ℓr) - simpo_gamma) (label_smoothing 0);
  rewards beta ℓ. Loss = mean + cpo_alpha nll_loss.
* CPO (CPOTrainer, loss_type "sigmoid", "hinge" or "ipo"): with x = Lc - Lr (ℓc - ℓr for ipo), per pair
  -(1 - ε) logsigmoid(beta x) - ε logsigmoid(-beta x), relu(1 - beta x), or (x - 1/(2 beta))²; rewards beta L
  (beta ℓ for ipo). Loss = mean + cpo_alpha nll_loss.
* ORPO: log_odds = (ℓc - ℓr) - (log1mexp(ℓc) - log1mexp(ℓr)); loss = nll_loss - beta mean(logsigmoid(log_odds));
  rewards beta ℓ.
* ``nll_loss``: TRL's ORPO takes the cross-entropy of the chosen rows over ALL their tokens, the prompt's included
  ("computed over the full prompt and response", as the ORPO authors' code does), token-averaged over the batch;
  TRL's CPO over the answer tokens, token-averaged over the batch. lorakit follows the ORPO paper's formula (as
  LLaMA-Factory does): each chosen answer's mean token loss, averaged over the pairs, i.e. -mean(ℓc). The oracle
  replaces TRL's ``nll_loss`` by that term (ℓc = Lc / its answer-token count where TRL's log-probabilities are
  sums), so the rest is checked against TRL unchanged.
* Logged: ``loss`` (that step's batch, before the update), ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracies`` (strict >), ``nll_loss``; ORPO also ``log_odds_ratio`` (the mean of
  logsigmoid(log_odds)) and ``log_odds_chosen``.

Pinned as in trl_dpo_oracle: torch AdamW (0.9, 0.999, eps 1e-8), no weight decay, constant lr, no warmup, gradient
norm clipped to ``max_grad_norm``, dropout off, fp32 on CPU, no gradient checkpointing, seed 0.
"""

from __future__ import annotations

from trl_dpo_oracle import _quiet, train_saved_adapter, trained, training_args


def _given_ids(feature, model=None) -> dict:
    """TRL's tokenize_row, replaced: the pair's token ids as lorakit built them."""
    prompt, out = list(feature["prompt_ids"]), {}
    out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [-100] * len(prompt) + answer
    return out


def _answer_nll(forward, summed: bool):
    """A concatenated_forward whose nll_loss is -mean(ℓ chosen), the chosen answers' mean token loss per pair
    (`summed`: TRL's chosen log-probabilities are sums, divided here by each answer's token count)."""

    def concatenated_forward(self, model, batch):
        out = list(forward(self, model, batch))
        chosen = out[0]
        if summed:  # TRL's labels: the prompt -100, then the answer; padding -100 too
            chosen = chosen / (batch["chosen_labels"][:, 1:] != -100).sum(-1).to(chosen.device)
        out[4] = -chosen.mean()
        return tuple(out)

    return concatenated_forward


def trl_ref_free(
    model_dir: str,
    adapter_dir: str,
    token_ids: list[tuple[list[int], list[int], list[int]]],
    *,
    kind: str,
    steps: int,
    lr: float,
    beta: float,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    max_grad_norm: float | None = 1.0,
    out_dir: str,
) -> dict:
    """Train the PEFT adapter in adapter_dir (on the HF model folder model_dir) with TRL: `kind` "orpo"
    (ORPOTrainer, `beta` its lambda), "simpo" (CPOTrainer, loss_type simpo, `gamma` its simpo_gamma) or "cpo"
    (CPOTrainer, `loss` its loss_type: sigmoid, hinge or ipo, with `label_smoothing`), `sft_weight`
    CPOTrainer's cpo_alpha, on the pairs `token_ids` = [(prompt ids, chosen ids, rejected ids)]. Returns
    {"logs": [TRL's logged metrics of each step], "adapter": {PEFT state-dict key: trained tensor}}."""
    if kind not in ("orpo", "simpo", "cpo"):
        raise ValueError(f"kind must be 'orpo', 'simpo' or 'cpo', got {kind!r}")
    loss_type = loss if kind == "cpo" else "simpo"
    with _quiet():
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        common = dict(
            **training_args(out_dir, len(token_ids), steps, lr, max_grad_norm),
            beta=beta,
            max_length=1 << 16,  # no truncation
            disable_dropout=True,
        )
        if kind == "orpo":
            args = ORPOConfig(**common)
            base_trainer = ORPOTrainer
        else:
            args = CPOConfig(
                **common,
                loss_type=loss_type,
                simpo_gamma=gamma,
                cpo_alpha=sft_weight,
                label_smoothing=label_smoothing,
            )
            base_trainer = CPOTrainer
        trainer_class = type(
            f"Given{base_trainer.__name__}",
            (base_trainer,),
            {
                "tokenize_row": staticmethod(_given_ids),
                "concatenated_forward": _answer_nll(
                    base_trainer.concatenated_forward, summed=kind == "cpo" and loss_type != "ipo"
                ),
            },
        )
        rows = [
            {"prompt": "", "chosen": "", "rejected": "", "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for p, c, r in token_ids
        ]
        trainer = train_saved_adapter(trainer_class, args, model_dir, adapter_dir, rows)

    logs, adapter = trained(trainer, steps)
    return {"logs": logs, "adapter": adapter}
