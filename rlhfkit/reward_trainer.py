"""TRL's RewardTrainer, adapted where it falls short for us.

What we keep from TRL: the HF Trainer loop (accelerate, DeepSpeed, checkpoints, resume, report_to), PEFT wrapping,
the chosen+rejected concatenated padded batch.
What we change:
- Pairs arrive tokenised by `rlhfkit.tokenization.tokenize_pair` (prompt truncated from the left, or dropped, and
  counted), instead of TRL silently dropping every pair longer than max_length.
- The loss is `rlhfkit.losses.bradley_terry_loss` (margin, centering), and its metrics come from the same tensors.
- Eval accuracy is exact (correct pairs / pairs over the whole eval set, across processes), not a mean of batch means.
- `source_index` passes through the collator for multi-objective training (rlhfkit.more).
- `pairwise_rewards` is the one place that runs the pairwise forward, so a packed or prefix-shared batch can replace
  the padded one later without touching the loss or the metrics.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from .losses import bradley_terry_loss


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows first, then rejected rows) plus `source_index` passthrough."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "source_index" in examples[0]:
            batch["source_index"] = torch.tensor([int(e["source_index"]) for e in examples], dtype=torch.long)
        return batch


class RewardModelTrainer(RewardTrainer):
    def __init__(self, *args, center_coefficient: float = 0.0, **kwargs):
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None and tokenizer.pad_token_id is not None:
            kwargs["data_collator"] = PairCollator(pad_token_id=tokenizer.pad_token_id)
        self.center_coefficient = center_coefficient
        self.eval_prefix = "eval_"  # rm_train.py switches it for the reward-statistics pass
        super().__init__(*args, **kwargs)
        self._pair_counts = {"train": defaultdict(float), "eval": defaultdict(float)}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            # `length` feeds `--train_sampling_strategy group_by_length` (batches of similar length, less padding)
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "source_index", "length"]

    # -- the pairwise forward -----------------------------------------------------------------------------------
    def pairwise_rewards(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_rewards [B], rejected_rewards [B]) for a batch laid out as [chosen rows; rejected rows]."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        chosen, rejected = torch.chunk(rewards, chunks=2)
        return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        chosen, rejected = self.pairwise_rewards(model, inputs)
        loss, metrics = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coefficient)
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
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens

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
                logs["num_tokens"] = self._total_train_tokens
        counts.clear()
        self._metrics[mode].clear()  # TRL's per-batch means are replaced by the exact counts above
        super().log(logs, start_time)
