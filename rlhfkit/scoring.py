"""Batched reward-model scoring of conversations, shared by eval_benchmark.py, annotate/, ppo_train.py, eval_winrate.py.

Each conversation is rendered with the *reward model's* tokenizer and chat template (never the policy's) and scored
once, through the packed, prefix-shared forward of rlhfkit.pairwise: the responses to one prompt share its tokens.
Under several processes each process scores a disjoint shard and the results are gathered, so every conversation is
scored exactly once.
"""

from __future__ import annotations

import math

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


def score_ids(model, pad_token_id: int, sequences: list[list[int]], batch_size: int = 8, progress: bool = False,
              desc: str = "scoring", groups: list[list[int]] | None = None, layout: str = "auto") -> list[float]:
    """Scores of token sequences, in input order, through the packed pairwise forward (rlhfkit.pairwise): `groups`
    (e.g. the responses to one prompt) compute their shared prefix once; `layout="padded"` is the plain
    right-padded batch."""
    from .pairwise import score_sequences

    return score_sequences(model, sequences, pad_token_id, batch_size, groups, layout, progress, desc)


def prompt_groups(conversations: list[list[dict]]) -> list[list[int]]:
    """Conversations answering the same prompt (all messages but the last), which share their rendered prefix."""
    import json

    from .pairwise import groups_by_key

    return groups_by_key([json.dumps(messages[:-1], sort_keys=True) for messages in conversations])


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                        max_length: int | None = None, progress: bool = False, accelerator=None,
                        truncate=None, layout: str = "auto") -> list[float]:
    """Reward of each conversation (prompt messages + assistant response), in input order.

    Responses to the same prompt are scored together, their prompt computed once (`layout`, see
    rlhfkit.pairwise). With `accelerator` and several processes: each process scores every world_size-th prompt
    group of the length-sorted order (balanced work), and all processes receive all scores.
    """
    was_training = model.training
    model.eval()
    sequences = encode_conversations(tokenizer, conversations, max_length, truncate)
    groups = prompt_groups(conversations)
    if accelerator is None or accelerator.num_processes == 1:
        scores = score_ids(model, tokenizer.pad_token_id, sequences, batch_size, progress, groups=groups,
                           layout=layout)
    else:
        from accelerate.utils import gather_object

        by_length = sorted(groups, key=lambda g: -sum(len(sequences[i]) for i in g))
        mine_groups = by_length[accelerator.process_index :: accelerator.num_processes]
        mine = [i for group in mine_groups for i in group]
        local_index = {i: n for n, i in enumerate(mine)}
        local = score_ids(model, tokenizer.pad_token_id, [sequences[i] for i in mine], batch_size,
                          progress and accelerator.is_main_process,
                          groups=[[local_index[i] for i in group] for group in mine_groups], layout=layout)
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
