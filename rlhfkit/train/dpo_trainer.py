"""TRL's DPOTrainer with the packed, prefix-shared pairwise forward of `rlhfkit.pairwise` and our own DPO losses.

What we keep from TRL, through its public API: its tokenisation (prompt_ids / chosen_ids / rejected_ids), its
truncation rule (`max_length`, `truncation_mode`, applied per sequence exactly as its collator does), its config
(`DPOConfig`), reference precomputation (which calls our `compute_ref_log_probs`), the LoRA reference (adapter off,
`trl.trainer.utils.use_adapter`), TR-DPO's reference sync callback, and, with `pairwise_forward="padded"`, its whole
forward and loss (`DPOTrainer.compute_loss`) unchanged. Also MoE models (router auxiliary loss) take that path.
What is ours: the forward (each pair's prompt computed once, pairs packed without padding, the LM head only where
the next token is a completion token) and the loss: every TRL `loss_type` with its options, as pure functions in
`rlhfkit/train/dpo_losses.py`, and the metrics TRL logs, under TRL's names. No private TRL method is called.
tests/test_dpo_losses.py checks every loss type against TRL's `compute_loss` on the same batch;
tests/test_pairwise_stages.py checks whole runs (losses, metrics, one optimizer step) against TRL's padded forward.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer

from rlhfkit import layout_check
from rlhfkit import pairwise as pw
from rlhfkit.train import token_budget
from rlhfkit.train.dpo_losses import (DPOBatch, DPOLossConfig, dpo_loss, sequence_logps, token_metric_sums,
                                      wpo_weights)


@dataclass
class PackedPreferenceCollator:
    """TRL's DPO rows → one `rlhfkit.pairwise` plan: sequences [c_0 … c_{B−1}, r_0 … r_{B−1}] (TRL's row order), pair i
    the group [i, B + i], scored from the first completion token. Truncation is TRL's DataCollatorForPreference's:
    prompt + completion cut to `max_length` per sequence, keeping the start or the end."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    kind: str = "prefix_shared"
    max_tokens_per_batch: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return token_budget.collate_chunks(examples, self.max_tokens_per_batch, self.kind, self.collate)

    def truncate(self, prompt: list[int], completion: list[int]) -> tuple[list[int], int]:
        """The sequence TRL's collator keeps, and where its completion starts in it."""
        sequence = prompt + completion
        start = len(prompt)
        if self.max_length is not None and len(sequence) > self.max_length:
            if self.truncation_mode == "keep_start":
                sequence = sequence[: self.max_length]
            elif self.truncation_mode == "keep_end":
                cut = len(sequence) - self.max_length
                sequence, start = sequence[cut:], start - cut
            else:
                raise ValueError(f"unsupported truncation_mode {self.truncation_mode!r}")
        return sequence, start  # start < 0 when keep_end cut into the prompt

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, score_from, completion_lengths = [], [], []
        for side in ("chosen_ids", "rejected_ids"):
            for example in examples:
                sequence, start = self.truncate(list(example["prompt_ids"]), list(example[side]))
                sequences.append(sequence)
                score_from.append(max(start, 1))  # position 0 predicts nothing (TRL scores from 1 on too)
                # TRL's completion_mask.sum(): completion tokens left after truncation, the first one included
                completion_lengths.append(len(sequence) - max(start, 0))
        size = len(examples)
        plan = pw.plan(sequences, [[i, size + i] for i in range(size)], kind=self.kind,
                       pad_token_id=self.pad_token_id, score_from=score_from)
        batch = plan.to_inputs()
        # what TRL's padded batch would report as tokens (attention_mask.sum()): prompt + completion, both rows
        batch["attention_mask"] = torch.tensor([len(s) for s in sequences])
        batch["completion_lengths"] = torch.tensor(completion_lengths)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch




def check_token_budget(config: DPOLossConfig, max_tokens_per_batch: int | None) -> None:
    """Token-budget micro-batches are exact only for losses that are means of independent per-pair terms."""
    if max_tokens_per_batch and config.couples_pairs:
        coupled = [t.value for t in config.loss_types if t.couples_pairs]
        raise ValueError(f"--loss_type {' '.join(coupled)} couples the pairs of a batch (sorts them or averages "
                         "their tokens), so --max_tokens_per_batch micro-batches would change the loss; drop it")


def _to_device(inputs: dict, device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


class PackedDPOTrainer(DPOTrainer):
    def __init__(self, *args, pairwise_forward: str = "auto", max_tokens_per_batch: int | None = None, **kwargs):
        model, training_args = kwargs.get("model"), kwargs.get("args")
        tokenizer = kwargs.get("processing_class")
        self.loss_config = DPOLossConfig.from_args(training_args)
        self.pairwise_layout = layout_check.choose_layout(model, pairwise_forward)
        if self.pairwise_layout != "padded" and getattr(model.config, "output_router_logits", False):
            self.pairwise_layout = "padded"  # MoE auxiliary losses need TRL's forward
        if self.pairwise_layout != "padded" and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PackedPreferenceCollator(
                pad_token_id=tokenizer.pad_token_id, max_length=training_args.max_length,
                truncation_mode=training_args.truncation_mode, kind=self.pairwise_layout,
                max_tokens_per_batch=max_tokens_per_batch)
        elif max_tokens_per_batch:
            raise ValueError("--max_tokens_per_batch needs a packed pairwise forward (not --pairwise_forward padded)")
        check_token_budget(self.loss_config, max_tokens_per_batch)
        self._loss_share = 1.0  # set by token_budget.run_chunks for a token-budget micro-batch
        # what our loss logs, averaged per logging step by `log` (TRL's own store holds what its padded loss logs)
        self.packed_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.packed_train_tokens = 0
        super().__init__(*args, **kwargs)
        if max_tokens_per_batch and self.is_deepspeed_enabled:
            raise ValueError("--max_tokens_per_batch is not supported under DeepSpeed yet (its engine steps the "
                             "optimizer on every backward); use --per_device_train_batch_size")

    # -- reference log-probs --------------------------------------------------------------------------------------
    def reference_context(self):
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
        return stack

    def packed_reference_logps(self, model, plan: pw.Plan) -> tuple[torch.Tensor, torch.Tensor]:
        with self.reference_context(), self.accelerator.autocast():
            scores = pw.token_logprobs(model, plan)
        logps = sequence_logps(pw.scatter_padded(scores.log_probs, plan), pw.padded_scored_mask(plan),
                               self.loss_config.ld_alpha)
        return logps.chunk(2, dim=0)

    def compute_ref_log_probs(self, model, inputs):
        if "pw_chunks" in inputs:
            parts = [self.compute_ref_log_probs(model, chunk) for chunk in inputs["pw_chunks"]]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if "pw_meta" not in inputs:
            return super().compute_ref_log_probs(model, inputs)
        return self.packed_reference_logps(model, pw.Plan.from_inputs(inputs))

    # -- the loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "pw_meta" not in inputs:  # --pairwise_forward padded: TRL's forward and loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        config = self.loss_config
        plan = pw.Plan.from_inputs(inputs)
        scores = pw.token_logprobs(model, plan, extras=True)
        mask = pw.padded_scored_mask(plan)  # [2B, L], chosen rows first
        token_logps = pw.scatter_padded(scores.log_probs, plan)
        chosen_logps, rejected_logps = sequence_logps(token_logps, mask, config.ld_alpha).chunk(2)
        if self.args.precompute_ref_log_probs:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.packed_reference_logps(reference, plan)
        chosen_lengths, rejected_lengths = inputs["completion_lengths"].chunk(2)
        chosen_token_logps, _ = token_logps.chunk(2)
        chosen_mask, _ = mask.chunk(2)
        weights = None
        if config.use_weighting:
            weights = wpo_weights(token_logps, pw.scatter_padded(scores.log_sum_sq_probs, plan), mask)
        batch = DPOBatch(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                         chosen_token_logps=chosen_token_logps, chosen_mask=chosen_mask, pair_weights=weights)
        loss, pair_metrics = dpo_loss(config, batch)
        token_sums = token_metric_sums(mask, pw.scatter_padded(scores.entropy, plan),
                                       pw.scatter_padded(scores.mean_logits, plan),
                                       pw.scatter_padded(scores.is_top1, plan, fill=False))
        self.record_packed_metrics(pair_metrics, token_sums, inputs["attention_mask"].sum())
        loss = loss * self._loss_share  # < 1 for a token-budget micro-batch: its share of the batch's pairs
        return (loss, None) if return_outputs else loss

    # -- metrics: TRL's names and reductions (means over all ranks' pairs or tokens) ------------------------------
    def record_packed_metrics(self, pair_metrics: dict, token_sums: dict, tokens: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        store = self.packed_metrics[mode]
        gather = self.accelerator.gather_for_metrics
        for name, (total, count) in token_sums.items():
            total, count = gather(total.float()).sum().item(), gather(count).sum().item()
            store[name].append(total / count if count > 0 else 0.0)
        if mode == "train":
            self.packed_train_tokens += int(gather(tokens).sum().item())
        store["num_tokens"] = [self.packed_train_tokens]
        for name, values in pair_metrics.items():
            store[name].append(self.accelerator.gather(values).mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self.packed_metrics[mode].items() if values}
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: value for key, value in metrics.items()})
        self.packed_metrics[mode].clear()
        super().log(logs, start_time)

    def fold_chunk_metrics(self, before: dict[str, int], inputs: dict) -> None:
        """A token-budget batch logs one value per micro-batch: fold them into the batch's value, weighted by pairs
        (what TRL logs for the whole batch), so the logged means do not depend on the budget."""
        pairs = [int(chunk["pw_last_index"].numel()) // 2 for chunk in inputs["pw_chunks"]]
        shares = [n / sum(pairs) for n in pairs]
        for key, values in self.packed_metrics["train" if self.model.training else "eval"].items():
            start = before.get(key, 0)
            if key != "num_tokens" and len(values) - start == len(shares):
                values[start:] = [sum(v * w for v, w in zip(values[start:], shares))]

    def packed_metric_counts(self) -> dict[str, int]:
        store = self.packed_metrics["train" if self.model.training else "eval"]
        return {key: len(values) for key, values in store.items()}

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "pw_chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        before = self.packed_metric_counts()
        loss = token_budget.run_chunks(self, super().training_step, model, inputs, num_items_in_batch)
        self.fold_chunk_metrics(before, inputs)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "pw_chunks" in inputs:
            before = self.packed_metric_counts()
            result = token_budget.predict_chunks(self, self.packed_prediction, model, inputs, prediction_loss_only,
                                       ignore_keys)
            self.fold_chunk_metrics(before, inputs)
            return result
        if "pw_meta" in inputs:
            return self.packed_prediction(model, inputs, prediction_loss_only, ignore_keys)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def packed_prediction(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # the loss only: TRL's logits for compute_metrics need a second, unfused forward (deprecated in TRL)
        inputs = _to_device(inputs, self.accelerator.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, return_outputs=False)
        return loss.detach(), None, None
