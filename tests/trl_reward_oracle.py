"""TRL's RewardTrainer (trl 1.16.0) on a PEFT LoRA adapter, as the oracle for lorakit's reward models.

`trl_reward` trains a saved PEFT adapter of a sequence classifier (task_type SEQ_CLS, the head in
modules_to_save) with TRL for `steps` optimizer steps, each on ALL pairs as one batch, and returns TRL's per-step
logs and the trained adapter. What follows was read in trl/trainer/reward_trainer.py of trl 1.16.0.

* Tokenization: a dataset with ``chosen_ids`` and ``rejected_ids`` columns is taken as tokenized and left as it
  is, so the oracle hands TRL lorakit's token ids (no EOS added, no chat template applied).
* Collation (``DataCollatorForPreference``): the chosen rows, then the rejected ones, right-padded with the pad
  token; the model's ``config.pad_token_id`` is the tokenizer's, by which the head finds each row's last token.
* Loss: ``-logsigmoid(r_chosen - r_rejected - margin).mean()`` (the dataset's ``margin`` column, if any) plus ``center_rewards_coefficient * mean((r_chosen +
  r_rejected) ** 2)``; logged as ``loss`` with ``accuracy`` (strict >) and ``margin`` (the mean difference).

Pinned as in trl_dpo_oracle: torch AdamW (0.9, 0.999, eps 1e-8), no weight decay, constant lr, no warmup, gradient
norm clipped to ``max_grad_norm``, dropout off, fp32 on CPU, no gradient checkpointing, seed 0.
"""

from __future__ import annotations

from trl_dpo_oracle import _load_adapter, _quiet, trained, training_args


def trl_reward(
    model_dir: str,
    adapter_dir: str,
    token_ids: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    lr: float,
    center_weight: float = 0.0,
    margins: list[float] | None = None,
    max_grad_norm: float | None = 1.0,
    out_dir: str,
) -> dict:
    """Train the PEFT adapter in adapter_dir (on the HF model folder model_dir, loaded as a one-output sequence
    classifier) with TRL's RewardTrainer on the pairs `token_ids` = [(chosen ids, rejected ids)]; `center_weight`
    is its center_rewards_coefficient, `margins` its dataset's margin column. Returns {"logs": [TRL's logged metrics of each step], "adapter": {PEFT
    state-dict key: trained tensor}}."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback

    with _quiet():
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(
            **training_args(out_dir, len(token_ids), steps, lr, max_grad_norm),
            max_length=None,  # no truncation
            disable_dropout=True,
            center_rewards_coefficient=center_weight or None,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32, local_files_only=True
        )
        config = LoraConfig.from_pretrained(adapter_dir)
        config.lora_dropout = 0.0
        config.inference_mode = False
        rows = [{"chosen_ids": c, "rejected_ids": r} for c, r in token_ids]
        for row, m in zip(rows, margins or [], strict=False):
            row["margin"] = m
        dataset = Dataset.from_list(rows)
        trainer = RewardTrainer(
            model=base, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config
        )
        _load_adapter(trainer.model, adapter_dir)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    logs, adapter = trained(trainer, steps)
    return {"logs": logs, "adapter": adapter}
