"""TRL's RewardTrainer, adapted where it falls short for us.

What we keep from TRL: the HF Trainer loop (accelerate, DeepSpeed, checkpoints, resume, report_to), PEFT wrapping,
the chosen+rejected concatenated padded batch.
What we change:
- Pairs arrive tokenised by `rlhfkit.tokenization.tokenize_pair` (prompt truncated from the left, or dropped, and
  counted), instead of TRL silently dropping every pair longer than max_length.
- The loss is `rlhfkit.train.losses.bradley_terry_loss` (margin, centering), and its metrics come from the same tensors.
- Eval accuracy is exact (correct pairs / pairs over the whole eval set, across processes), not a mean of batch means.
- `source_index` passes through the collator for multi-objective training (rlhfkit.train.more_trainer).
- The pairwise forward is `rlhfkit.pairwise`'s (`pairwise_forward`, default the fastest exact layout for the model):
  each pair's prompt is computed once and pairs are packed without padding; `padded` keeps TRL's collator and
  forward. `max_tokens_per_batch` splits each batch into micro-batches of at most that many laid-out tokens, each
  weighted by its share of the batch's pairs, so the loss, the gradient and the schedule are those of the whole
  batch (rlhfkit.train.token_budget.split_by_tokens).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhfkit import layout_check
from rlhfkit import pairwise as pw
from rlhfkit.train import token_budget
from rlhfkit.train.losses import bradley_terry_loss


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows first, then rejected rows) plus `source_index` passthrough."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "source_index" in examples[0]:
            batch["source_index"] = torch.tensor([int(e["source_index"]) for e in examples], dtype=torch.long)
        return batch


@dataclass
class PackedPairCollator:
    """Pairs → one `rlhfkit.pairwise` plan (sequences [c_0, r_0, c_1, r_1, …], each pair a group), plus margins,
    source indices and the token count TRL's padded batch would report. With `max_tokens_per_batch`, a list of such
    plans (micro-batches) under `pw_chunks`."""

    pad_token_id: int
    kind: str = "prefix_shared"
    position_offset: int = 0
    max_tokens_per_batch: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return token_budget.collate_chunks(examples, self.max_tokens_per_batch, self.kind, self._collate)

    def _collate(self, examples):
        sequences = [ids for e in examples for ids in (e["chosen_ids"], e["rejected_ids"])]
        groups = [[2 * i, 2 * i + 1] for i in range(len(examples))]
        batch = pw.plan(sequences, groups, kind=self.kind, pad_token_id=self.pad_token_id,
                        position_offset=self.position_offset).to_inputs()
        batch["num_tokens"] = torch.tensor(sum(len(s) for s in sequences))
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples])
        if "source_index" in examples[0]:
            batch["source_index"] = torch.tensor([int(e["source_index"]) for e in examples], dtype=torch.long)
        return batch


class RewardModelTrainer(RewardTrainer):
    def __init__(self, *args, center_coefficient: float = 0.0, pairwise_forward: str = "auto",
                 max_tokens_per_batch: int | None = None, **kwargs):
        tokenizer = kwargs.get("processing_class")
        model = kwargs.get("model")
        self.pairwise_layout = "padded"
        if kwargs.get("data_collator") is None and tokenizer is not None and tokenizer.pad_token_id is not None:
            self.pairwise_layout = layout_check.choose_layout(model, pairwise_forward)
            if self.pairwise_layout == "padded":
                kwargs["data_collator"] = PairCollator(pad_token_id=tokenizer.pad_token_id)
            else:
                kwargs["data_collator"] = PackedPairCollator(
                    pad_token_id=tokenizer.pad_token_id, kind=self.pairwise_layout,
                    position_offset=pw.position_offset(model), max_tokens_per_batch=max_tokens_per_batch)
        if max_tokens_per_batch and self.pairwise_layout == "padded":
            raise ValueError("--max_tokens_per_batch needs a packed pairwise forward (not --pairwise_forward padded)")
        self.center_coefficient = center_coefficient
        self.eval_prefix = "eval_"  # rm_train.py switches it for the reward-statistics pass
        self._loss_share = 1.0
        self.train_tokens = 0  # tokens of the training batches seen (logged as num_tokens)
        super().__init__(*args, **kwargs)
        if max_tokens_per_batch and self.is_deepspeed_enabled:
            raise ValueError("--max_tokens_per_batch is not supported under DeepSpeed yet (its engine steps the "
                             "optimizer on every backward); use --per_device_train_batch_size")
        self._pair_counts = {"train": defaultdict(float), "eval": defaultdict(float)}

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Token-budget micro-batches: forward and backward each, weighted by its share of the batch's pairs."""
        if "pw_chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        return token_budget.run_chunks(self, super().training_step, model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "pw_chunks" in inputs:
            return token_budget.predict_chunks(self, super().prediction_step, model, inputs, prediction_loss_only, ignore_keys)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # -- the pairwise forward -----------------------------------------------------------------------------------
    def pairwise_rewards(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_rewards [B], rejected_rewards [B]) for a packed plan, or TRL's [chosen rows; rejected rows]."""
        if "pw_meta" in inputs:
            rewards = pw.sequence_rewards(model, pw.Plan.from_inputs(inputs))
            return rewards[0::2], rewards[1::2]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        chosen, rejected = torch.chunk(rewards, chunks=2)
        return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        chosen, rejected = self.pairwise_rewards(model, inputs)
        loss, metrics = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coefficient)
        loss = loss * self._loss_share
        self._record(mode, chosen, rejected, metrics, inputs)
        if return_outputs:
            return loss, {"chosen_rewards": chosen, "rejected_rewards": rejected}
        return loss

    # -- metrics ----------------------------------------------------------------------------------------------------
    def _record(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor, metrics: dict, inputs: dict) -> None:
        with torch.no_grad():
            stacked = torch.stack([chosen.detach().float(), rejected.detach().float()], dim=1)  # [B, 2]
            gathered = self.accelerator.gather_for_metrics(stacked)
            diff = gathered[:, 0] - gathered[:, 1]
            counts = self._pair_counts[mode]
            counts["pairs"] += diff.numel()
            counts["correct"] += (diff > 0).sum().item()
            counts["margin_sum"] += diff.sum().item()
            counts["reward_sum"] += gathered.sum().item()
            counts["reward_sq_sum"] += (gathered ** 2).sum().item()
            if mode == "train":
                count = inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum()
                tokens = self.accelerator.gather_for_metrics(count.reshape(1)).sum().item()
                self.train_tokens += tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        counts = self._pair_counts[mode]
        if counts["pairs"]:
            n = counts["pairs"]
            mean = counts["reward_sum"] / (2 * n)
            var = max(counts["reward_sq_sum"] / (2 * n) - mean ** 2, 0.0)
            prefix = self.eval_prefix if mode == "eval" else ""
            logs.update({
                f"{prefix}accuracy": counts["correct"] / n,
                f"{prefix}margin": counts["margin_sum"] / n,
                f"{prefix}reward_mean": mean,
                f"{prefix}reward_std": var ** 0.5,
                f"{prefix}pairs": n,
            })
            if mode == "train":
                logs["num_tokens"] = self.train_tokens
        counts.clear()
        # transformers' Trainer.log, not TRL's: TRL's adds the per-batch means its own compute_loss records, and
        # that compute_loss never runs here (ours replaces it); the exact counts above are the metrics
        Trainer.log(self, logs, start_time)
