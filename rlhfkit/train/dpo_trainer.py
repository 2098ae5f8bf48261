"""TRL's DPOTrainer with the packed, prefix-shared pairwise forward of `rlhfkit.pairwise`.

What we keep from TRL: everything but the forward — its tokenisation (prompt_ids / chosen_ids / rejected_ids), its
truncation rule (`max_length`, `truncation_mode`, applied per sequence exactly as its collator does), every
`loss_type`, `ld_alpha`, WPO weighting, its metrics, reference precomputation and the LoRA reference (adapter off).
What we change: the forward. Each pair's prompt is computed once and pairs are packed without padding; the LM head
runs only at the positions whose next token is a completion token. The per-token log-probs (and the entropy /
mean-logit / top-1 metrics) are scattered back into TRL's padded [chosen rows; rejected rows] shape and handed to
TRL's own loss code, so every loss and metric is TRL's, computed from the same numbers the padded forward gives
(tests/test_pairwise_stages.py checks losses, metrics and one optimizer step against TRL's own forward).
`pairwise_forward="padded"` is TRL unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from trl import DPOTrainer

from rlhfkit import pairwise as pw


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
        return pw.collate_chunks(examples, self.max_tokens_per_batch, self.kind, self.collate)

    def truncate(self, prompt: list[int], completion: list[int]) -> tuple[list[int], int]:
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
        # TRL's padded forward scores completion tokens from position 1 on (position 0 has no prediction)
        return sequence, max(start, 1)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, score_from = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for example in examples:
                sequence, start = self.truncate(list(example["prompt_ids"]), list(example[side]))
                sequences.append(sequence)
                score_from.append(start)
        size = len(examples)
        plan = pw.plan(sequences, [[i, size + i] for i in range(size)], kind=self.kind,
                       pad_token_id=self.pad_token_id, score_from=score_from)
        batch = plan.to_inputs()
        # what TRL's padded batch would report as tokens (attention_mask.sum()): prompt + completion, both rows
        batch["attention_mask"] = torch.tensor([len(s) for s in sequences])
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch


def _padded_outputs(scores: pw.TokenScores, plan: pw.Plan) -> tuple[SimpleNamespace, torch.Tensor]:
    """Per-token scores in TRL's padded layout: outputs with [2B, L] fields and the matching [2B, L + 1]
    completion mask (TRL shifts it by one)."""
    mask = pw.padded_scored_mask(plan)
    fields = {"log_probs": pw.scatter_padded(scores.log_probs, plan)}
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        value = getattr(scores, name)
        fields[name] = None if value is None else pw.scatter_padded(value, plan)
    fields["is_top1"] = None if scores.is_top1 is None else pw.scatter_padded(scores.is_top1, plan, fill=False)
    completion_mask = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
    return SimpleNamespace(**fields, aux_loss=None, logits=None), completion_mask


class PackedDPOTrainer(DPOTrainer):
    def __init__(self, *args, pairwise_forward: str = "auto", max_tokens_per_batch: int | None = None, **kwargs):
        model, training_args = kwargs.get("model"), kwargs.get("args")
        tokenizer = kwargs.get("processing_class")
        self.pairwise_layout = pw.choose_layout(model, pairwise_forward)
        if self.pairwise_layout != "padded" and getattr(model.config, "output_router_logits", False):
            self.pairwise_layout = "padded"  # MoE auxiliary losses need TRL's forward
        if self.pairwise_layout != "padded" and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PackedPreferenceCollator(
                pad_token_id=tokenizer.pad_token_id, max_length=training_args.max_length,
                truncation_mode=training_args.truncation_mode, kind=self.pairwise_layout,
                max_tokens_per_batch=max_tokens_per_batch)
        elif max_tokens_per_batch:
            raise ValueError("--max_tokens_per_batch needs a packed pairwise forward (not --pairwise_forward padded)")
        self._loss_share = 1.0
        super().__init__(*args, **kwargs)
        if max_tokens_per_batch and self.is_deepspeed_enabled:
            raise ValueError("--max_tokens_per_batch is not supported under DeepSpeed yet (its engine steps the "
                             "optimizer on every backward); use --per_device_train_batch_size")

    # -- reference log-probs --------------------------------------------------------------------------------------
    def _reference_context(self):
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter
        from accelerate.utils import is_peft_model

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
        return stack

    def _packed_reference_logps(self, model, plan: pw.Plan) -> tuple[torch.Tensor, torch.Tensor]:
        with self._reference_context(), self.accelerator.autocast():
            scores = pw.token_logprobs(model, plan)
        padded, _ = _padded_outputs(scores, plan)
        logps = self._aggregate(padded.log_probs, plan)
        return logps.chunk(2, dim=0)

    def _aggregate(self, per_token: torch.Tensor, plan: pw.Plan) -> torch.Tensor:
        """Σ over each sequence's completion tokens, with TRL's `ld_alpha` (LD-DPO) split when set."""
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        mask = pw.padded_scored_mask(plan)
        position = mask.cumsum(dim=1)
        lengths = mask.sum(dim=1)
        chosen, rejected = lengths.chunk(2)
        shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
        shared_mask = (position > 0) & (position <= shared)
        return (per_token * shared_mask).sum(1) + self.ld_alpha * (per_token * (position > shared)).sum(1)

    def compute_ref_log_probs(self, model, inputs):
        if "pw_chunks" in inputs:
            parts = [self.compute_ref_log_probs(model, chunk) for chunk in inputs["pw_chunks"]]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if "pw_meta" not in inputs:
            return super().compute_ref_log_probs(model, inputs)
        return self._packed_reference_logps(model, pw.Plan.from_inputs(inputs))

    # -- the loss -------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        if "pw_meta" not in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        plan = pw.Plan.from_inputs(inputs)
        scores = pw.token_logprobs(model, plan, extras=True)
        outputs, completion_mask = _padded_outputs(scores, plan)
        scale = self._loss_share  # < 1 for a token-budget micro-batch: its share of the batch's pairs
        trl_inputs = {"input_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
                      "attention_mask": inputs["attention_mask"]}
        precomputed = self.precompute_ref_logps
        if precomputed:
            trl_inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"]
            trl_inputs["ref_rejected_logps"] = inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            trl_inputs["ref_chosen_logps"], trl_inputs["ref_rejected_logps"] = self._packed_reference_logps(
                reference, plan)
        # TRL's loss code, fed our log-probs: its "model" returns them; its reference branch reads the inputs
        self.precompute_ref_logps = True
        try:
            result = super()._compute_loss(lambda **_: outputs, trl_inputs, return_outputs)
        finally:
            self.precompute_ref_logps = precomputed
        if scale != 1.0:
            return (result[0] * scale, result[1]) if return_outputs else result * scale
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "pw_chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        return pw.run_chunks(self, super().training_step, model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "pw_chunks" in inputs:
            return pw.predict_chunks(self, self._packed_prediction, model, inputs, prediction_loss_only, ignore_keys)
        if "pw_meta" in inputs:
            return self._packed_prediction(model, inputs, prediction_loss_only, ignore_keys)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _packed_prediction(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # the loss only: TRL's logits for compute_metrics need a second, unfused forward (deprecated in TRL)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, return_outputs=False)
        return loss.detach(), None, None
