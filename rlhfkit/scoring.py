"""Batched reward-model scoring of conversations, shared by eval_benchmark.py, annotate/, ppo_train.py, eval_winrate.py.

Each conversation is rendered with the *reward model's* tokenizer and chat template (never the policy's), batched by
length so padding stays small, and scored once. Under several processes each process scores a disjoint shard and
the results are gathered, so every conversation is scored exactly once.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .tokenization import render_ids


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None = None,
                         truncate=None) -> list[list[int]]:
    """Token ids per conversation; longer ones lose prompt tokens from the left (the BOS/CLS token is kept).

    `truncate(ids) -> ids`, when given, replaces that rule (eval_benchmark.py passes RewardBench's, see
    rlhfkit.rewardbench.TruncationPlan); `max_length` is then ignored.
    """
    encoded = []
    special = set(tokenizer.all_special_ids)
    for messages in conversations:
        ids = render_ids(tokenizer, messages)
        if truncate is not None:
            ids = truncate(ids)
        elif max_length is not None and len(ids) > max_length:
            head = ids[:1] if ids[0] in special else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
        encoded.append(ids)
    return encoded


@torch.no_grad()
def score_ids(model, pad_token_id: int, sequences: list[list[int]], batch_size: int = 8, progress: bool = False,
              desc: str = "scoring") -> list[float]:
    """Scores of token sequences, longest first in right-padded batches. Returns scores in input order."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: call rlhfkit.models.ensure_pad_token first")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress):
        width = max(len(sequences[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            seq = sequences[index]
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, index in enumerate(batch):
            scores[index] = float(logits[row, 0].float())
    return scores


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                        max_length: int | None = None, progress: bool = False, accelerator=None,
                        truncate=None) -> list[float]:
    """Reward of each conversation (prompt messages + assistant response), in input order.

    With `accelerator` and several processes: each process scores every world_size-th conversation of the
    length-sorted order (balanced work), and all processes receive all scores.
    """
    was_training = model.training
    model.eval()
    sequences = encode_conversations(tokenizer, conversations, max_length, truncate)
    if accelerator is None or accelerator.num_processes == 1:
        scores = score_ids(model, tokenizer.pad_token_id, sequences, batch_size, progress)
    else:
        from accelerate.utils import gather_object

        by_length = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        mine = by_length[accelerator.process_index :: accelerator.num_processes]
        local = score_ids(model, tokenizer.pad_token_id, [sequences[i] for i in mine], batch_size,
                          progress and accelerator.is_main_process)
        gathered = gather_object([(index, score) for index, score in zip(mine, local)])
        scores = [math.nan] * len(sequences)
        for index, score in gathered:
            scores[index] = score
        if any(math.isnan(s) for s in scores):
            raise RuntimeError("distributed scoring lost conversations; this is a bug")
    model.train(was_training)
    return scores


def shard_and_gather(score_fn, items: list, accelerator=None) -> list[float]:
    """Run `score_fn(list) -> list[float]` on this process's share of `items` and gather all results in order.

    For scorers that have no distributed mode of their own (e.g. the DPO implicit reward).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return list(score_fn(items))
    from accelerate.utils import gather_object

    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    local = score_fn([items[i] for i in mine]) if mine else []
    gathered = gather_object(list(zip(mine, local)))
    scores = [math.nan] * len(items)
    for index, score in gathered:
        scores[index] = score
    return scores
