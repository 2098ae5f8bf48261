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
