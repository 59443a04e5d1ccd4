"""TRL's KTOTrainer (trl 1.16.0) on a PEFT LoRA adapter, as the oracle for lorakit's KTO.

`trl_kto` trains a saved PEFT adapter with TRL for one optimizer step per given batch and returns TRL's per-step
logs, the trained adapter and the token ids TRL built. What follows was read in trl/trainer/kto_trainer.py and
kto_config.py of trl 1.16.0.

* Data: unpaired rows ``{"prompt", "completion", "label"}``, texts or lists of messages. Tokenized as
  DPOTrainer tokenizes (tests/trl_dpo_oracle.py): the prompt ids are the common prefix of ``ids(prompt)`` and
  ``ids(prompt + completion)``, the completion ids the rest; text completions get ``eos_token`` appended, chat
  ones end as the template renders them.
* The KL rows: the completions rotated by one within each chunk of ``per_device_train_batch_size`` rows of the
  dataset, in its order (``KL_completion_ids`` of row i = completion ids of row i-1, the chunk's first taking its
  last's), and the training batches are those chunks in order (``train_sampling_strategy="sequential"``, KTO's
  default). lorakit rotates within each micro-batch, in the order its loop draws the rows; so `trl_kto` takes the
  batches as lorakit's steps draw them and gives TRL their concatenation, one chunk per step.
* Log-probabilities: summed over the completion tokens (policy with the adapter, reference with it disabled;
  the KL rows' policy pass without gradients). ``kl = mean(policy_KL - ref_KL)`` over the batch, clamped at 0
  (gathered over processes: one here).
* Loss (``loss_type="kto"``): desirable rows ``1 - sigmoid(beta (r - kl))``, undesirable ``1 - sigmoid(beta (kl -
  r))``, r = policy - reference; weighted by ``desirable_weight`` / ``undesirable_weight``; the mean over all rows
  (``nanmean``).
* Logged per step (before its update): ``loss``, ``kl``, ``rewards/chosen`` and ``rewards/rejected`` (the mean of
  beta r over the desirable, resp. undesirable rows, present when there are any), ``logps/chosen``, ...

Pinned as in trl_dpo_oracle (`training_args`): torch AdamW, constant lr, no warmup or weight decay, clipping at
``max_grad_norm``, dropout off, fp32 on CPU, no truncation, reference log-probabilities per step (not
precomputed), seed 0.
"""

from __future__ import annotations

from trl_dpo_oracle import _quiet, train_saved_adapter, trained, training_args


def trl_kto(
    model_dir: str,
    adapter_dir: str,
    batches: list[list[dict]],
    *,
    lr: float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    max_grad_norm: float | None = 1.0,
    out_dir: str,
) -> dict:
    """Train the PEFT adapter in adapter_dir (on the HF model folder model_dir) with TRL's KTOTrainer, one step
    on each of `batches` (lists of rows {"prompt", "completion", "label"}, all of one size, in the order each
    step takes them), the base model (adapter off) as the reference. Returns {"logs": [TRL's logged metrics of
    each step], "adapter": {PEFT state-dict key: trained tensor}, "token_ids": [(prompt ids, completion ids, KL
    completion ids) of each row of each batch, in order]}."""
    size = len(batches[0])
    if size < 2 or any(len(b) != size for b in batches):
        raise ValueError("batches must all have the same size, at least 2")
    with _quiet():
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(
            **training_args(out_dir, size, len(batches), lr, max_grad_norm),
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            loss_type="kto",
            max_length=None,
            precompute_ref_log_probs=False,
            pad_to_multiple_of=None,
            sync_ref_model=False,
            disable_dropout=True,
            dataset_num_proc=None,
        )
        if args.train_sampling_strategy != "sequential":
            raise RuntimeError("TRL's KTO no longer samples sequentially: the KL rows would not be lorakit's")
        rows = [row for batch in batches for row in batch]
        trainer = train_saved_adapter(KTOTrainer, args, model_dir, adapter_dir, rows)

    logs, adapter = trained(trainer, len(batches))
    data = trainer.train_dataset
    columns = (data["prompt_ids"], data["completion_ids"], data["KL_completion_ids"])
    token_ids = [(list(p), list(c), list(k)) for p, c, k in zip(*columns, strict=True)]
    if len(token_ids) != size * len(batches):
        raise RuntimeError("TRL dropped rows")
    return {"logs": logs, "adapter": adapter, "token_ids": token_ids}
