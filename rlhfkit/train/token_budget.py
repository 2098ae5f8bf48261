"""Token-budget micro-batches for the pairwise trainers (`--max_tokens_per_batch`, what verl calls dynamic batch
size): a batch split by laid-out tokens, each micro-batch's loss weighted by its share of the batch's pairs, so the
loss, the gradient and the schedule are those of the whole batch."""

from __future__ import annotations

import contextlib

import torch

from rlhfkit import pairwise as pw


def pair_cost(example: dict, kind: str) -> int:
    """Tokens a pair costs in a layout: its prompt once (prefix_shared) or twice, plus both responses."""
    if "prompt_ids" in example:  # DPO rows: prompt, chosen completion, rejected completion
        prompt, chosen, rejected = (len(example[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        return (prompt if kind == "prefix_shared" else 2 * prompt) + chosen + rejected
    chosen, rejected = example["chosen_ids"], example["rejected_ids"]
    shared = pw.shared_prefix_length([chosen, rejected])
    return len(chosen) + len(rejected) - (shared if kind == "prefix_shared" else 0)


def split_by_tokens(examples: list[dict], budget: int | None, kind: str) -> list[list[dict]]:
    """Consecutive runs of examples whose layout costs at most `budget` tokens (a pair longer than the budget runs
    alone). No budget: one run."""
    if not budget:
        return [examples]
    chunks, current, used = [], [], 0
    for example in examples:
        cost = pair_cost(example, kind)
        if current and used + cost > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(example)
        used += cost
    chunks.append(current)
    return chunks


def collate_chunks(examples: list[dict], budget: int | None, kind: str, collate) -> dict:
    """A collator's output: `collate(examples)`, or with a token budget one `collate(run)` per micro-batch under
    `pw_chunks` (what `run_chunks` / `predict_chunks` consume)."""
    chunks = split_by_tokens(examples, budget, kind)
    if len(chunks) == 1:
        return collate(examples)
    return {"pw_chunks": [collate(chunk) for chunk in chunks], "pw_pairs": torch.tensor(len(examples))}


def _pairs_in(chunk: dict) -> int:
    return int(chunk["pw_last_index"].numel()) // 2


def run_chunks(trainer, step, model, inputs: dict, num_items_in_batch=None):
    """Run `step` (the Trainer's training_step: forward + backward) on each micro-batch, its loss weighted by its
    share of the batch's pairs (`trainer._loss_share`, applied in compute_loss), gradients synchronised once."""
    chunks = inputs["pw_chunks"]
    total = sum(_pairs_in(chunk) for chunk in chunks)
    shares = [_pairs_in(chunk) / total for chunk in chunks]
    loss = 0.0
    try:
        for i, chunk in enumerate(chunks):
            trainer._loss_share = shares[i]
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else trainer.accelerator.no_sync(model)
            with sync:
                loss = loss + step(model, chunk, num_items_in_batch)
    finally:
        trainer._loss_share = 1.0
    return loss


def predict_chunks(trainer, step, model, inputs: dict, prediction_loss_only, ignore_keys):
    """`run_chunks` for evaluation: the weighted loss of the whole batch; logits concatenated."""
    chunks = inputs["pw_chunks"]
    total = sum(_pairs_in(chunk) for chunk in chunks)
    shares = [_pairs_in(chunk) / total for chunk in chunks]
    loss, logits = 0.0, []
    try:
        for chunk, share in zip(chunks, shares):
            trainer._loss_share = share
            chunk_loss, chunk_logits, _ = step(model, chunk, prediction_loss_only, ignore_keys)
            loss = loss + chunk_loss
            if chunk_logits is not None:
                logits.append(chunk_logits)
    finally:
        trainer._loss_share = 1.0
    if not logits:
        return loss, None, None
    if isinstance(logits[0], (tuple, list)):
        return loss, tuple(torch.cat(parts) for parts in zip(*logits)), None
    return loss, torch.cat(logits), None

