"""Batched reward-model scoring of conversations, shared by eval_benchmark.py, annotate/, ppo_train.py, eval_winrate.py.

Each conversation is rendered with the *reward model's* tokenizer and chat template (never the policy's) and scored
once, through the packed, prefix-shared forward of rlhfkit.pairwise: the responses to one prompt share its tokens.
Under several processes each process scores a disjoint shard and the results are gathered, so every conversation is
scored exactly once.
"""

from __future__ import annotations

import math

import torch

from . import pairwise as pw
from .tokenization import render_ids


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None = None,
                         truncate=None) -> list[list[int]]:
    """Token ids per conversation; longer ones lose prompt tokens from the left (the BOS/CLS token is kept).

    `truncate(ids) -> ids`, when given, replaces that rule (eval_benchmark.py passes RewardBench's, see
    rlhfkit.eval.rewardbench.TruncationPlan); `max_length` is then ignored.
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


def prompt_groups(conversations: list[list[dict]]) -> list[list[int]]:
    """Conversations answering the same prompt (all messages but the last), which share their rendered prefix."""
    import json

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
        scores = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size, groups, layout, progress)
    else:
        from accelerate.utils import gather_object

        by_length = sorted(groups, key=lambda g: -sum(len(sequences[i]) for i in g))
        mine_groups = by_length[accelerator.process_index :: accelerator.num_processes]
        mine = [i for group in mine_groups for i in group]
        local_index = {i: n for n, i in enumerate(mine)}
        local = score_sequences(model, [sequences[i] for i in mine], tokenizer.pad_token_id, batch_size,
                                [[local_index[i] for i in group] for group in mine_groups], layout,
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


def response_conversations(prompts: list[list[dict]], responses: list[str]) -> list[list[dict]]:
    """Each response appended to its prompt as an assistant turn: what a reward model scores."""
    return [list(prompt) + [{"role": "assistant", "content": response}] for prompt, response in zip(prompts, responses)]


class RewardModelScorer:
    """A reward model from disk (a stage dir, any `*ForSequenceClassification` checkpoint or a built-in name) as a
    scorer: `scorer(prompts, responses) -> list[float]`, each response appended to its prompt as an assistant turn,
    rendered with the *reward model's* tokenizer and chat template and scored by `score_conversations`.

    The one reward-model wrapper: `labelers.RewardModelLabeler` (an RM dir given as a labeler),
    `annotate/get_rewards.py --reward_model_path`, `judges.RewardModelJudge` (eval_winrate.py) and PPO's
    `rlhfkit.rl.rewards.ModelReward` score through it. The model is frozen (no gradients, eval mode).

    `device`: where the model goes (None: where it was loaded). `accelerator`: with several processes each scores a
    disjoint share and all receive all scores. `progress`: a progress bar (None: when there are more than four
    batches). `model_kwargs` go to `models.load_reward_model` (e.g. `dtype`).
    """

    def __init__(self, model_path: str, batch_size: int = 16, max_length: int | None = None, device=None, *,
                 chat_template: str | None = None, accelerator=None, progress: bool | None = None,
                 **model_kwargs):
        from .models import ensure_pad_token, load_reward_model, load_tokenizer, resolve_model

        self.path = model_path
        local, self.record = resolve_model(model_path, role="reward model")
        self.tokenizer = load_tokenizer(local, chat_template)
        self.model = load_reward_model(local, **model_kwargs)
        ensure_pad_token(self.tokenizer, self.model)
        if device is not None:
            self.model.to(device)
        self.model.requires_grad_(False).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.accelerator, self.progress = accelerator, progress
        self.info = {"labeler": str(model_path), "kind": "reward_model", **self.record}

    def __call__(self, prompts: list[list[dict]], responses: list[str], progress: bool | None = None) -> list[float]:
        conversations = response_conversations(prompts, responses)
        if progress is None:
            progress = self.progress if self.progress is not None else len(conversations) > 4 * self.batch_size
        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size, self.max_length,
                                   progress=progress, accelerator=self.accelerator)


# ---------------------------------------------------------------------------------------------------------------
# many sequences through the pairwise forward, groups kept whole (annotation's K samples, a pair, RewardBench 2's candidates)
# ---------------------------------------------------------------------------------------------------------------
def groups_by_key(keys: list) -> list[list[int]]:
    """Indices grouped by equal key (e.g. the prompt each response answers), in order of first appearance."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def linked_groups(count: int, links: list[tuple[int, int]]) -> list[list[int]]:
    """Indices 0 … count−1 grouped by connectivity of `links` (e.g. each pair's chosen and rejected after identical
    sequences were merged, so one sequence may belong to several pairs)."""
    parent = list(range(count))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        parent[root(a)] = root(b)
    return groups_by_key([root(i) for i in range(count)])


def batched_plans(sequences: list[list[int]], groups: list[list[int]] | None, batch_size: int, kind: str,
                  pad_token_id: int, score_from: list[int] | None = None, position_offset: int = 0):
    """Yield (sequence indices, Plan) covering every sequence once: groups kept whole, longest first, at most
    `batch_size` sequences per forward (a larger group runs alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    groups = groups or [[i] for i in range(len(sequences))]
    cost = lambda g: max(len(sequences[i]) for i in g) + sum(len(sequences[i]) for i in g)  # noqa: E731
    batch: list[list[int]] = []
    for group in sorted(groups, key=lambda g: -cost(g)):
        if batch and sum(map(len, batch)) + len(group) > batch_size:
            yield _plan_for(batch, sequences, kind, pad_token_id, score_from, position_offset)
            batch = []
        batch.append(group)
    if batch:
        yield _plan_for(batch, sequences, kind, pad_token_id, score_from, position_offset)


def _plan_for(batch, sequences, kind, pad_token_id, score_from, position_offset):
    index = [i for group in batch for i in group]
    local = {i: n for n, i in enumerate(index)}
    plan_ = pw.plan([sequences[i] for i in index], [[local[i] for i in group] for group in batch], kind=kind,
                 pad_token_id=pad_token_id, position_offset=position_offset,
                 score_from=None if score_from is None else [score_from[i] for i in index])
    return index, plan_


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8,
                    groups: list[list[int]] | None = None, layout: str = "auto", progress: bool = False,
                    desc: str = "scoring") -> list[float]:
    """Reward-model score of each token sequence, in input order, through the pairwise forward (rlhfkit.pairwise):
    `groups` (e.g. the responses to one prompt) compute their shared prefix once; `layout="padded"` is the plain
    right-padded batch."""
    from tqdm.auto import tqdm

    if pad_token_id is None:
        raise ValueError("pad_token_id is None: call rlhfkit.models.ensure_pad_token first")
    from .layout_check import choose_layout

    kind = choose_layout(model, layout)
    device = pw.device_of(model)
    scores = [0.0] * len(sequences)
    plans = list(batched_plans(sequences, groups, batch_size, kind, pad_token_id,
                               position_offset=pw.position_offset(model)))
    for index, plan_ in tqdm(plans, desc=desc, disable=not progress):
        values = pw.sequence_rewards(model, plan_.to(device)).float().cpu().tolist()
        for i, value in zip(index, values):
            scores[i] = value
    return scores


@torch.no_grad()
def sequence_logprob_sums(model, sequences: list[list[int]], score_from: list[int], pad_token_id: int,
                          batch_size: int = 8, groups: list[list[int]] | None = None, layout: str = "auto",
                          progress: bool = False, desc: str = "log-probs", reduce: str = "sum") -> list[float]:
    """Σ (reduce="sum") or mean (reduce="mean") of log p(token | before) over tokens score_from[i] … end of each
    sequence, in input order; `groups` share their common prefix and the LM head runs only at scored positions."""
    from tqdm.auto import tqdm

    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be sum or mean, not {reduce!r}")
    from .layout_check import choose_layout

    kind = choose_layout(model, layout)
    if kind == "packed" and pw.is_encoder(pw.unwrap(model).config):
        raise ValueError("log-probs need a causal LM")
    device = pw.device_of(model)
    out = [0.0] * len(sequences)
    plans = list(batched_plans(sequences, groups, batch_size, kind, pad_token_id, score_from=score_from))
    for index, plan_ in tqdm(plans, desc=desc, disable=not progress):
        plan_ = plan_.to(device)
        sums = pw.sum_per_sequence(pw.token_logprobs(model, plan_).log_probs, plan_)
        if reduce == "mean":
            counts = pw.sum_per_sequence(torch.ones_like(plan_.token_sequence, dtype=sums.dtype), plan_)
            sums = sums / counts.clamp(min=1)
        for i, value in zip(index, sums.float().cpu().tolist()):
            out[i] = value
    return out
