"""RL reward sources from the two reward models that do not give one scalar per response: a pairwise preference
model (pm_train.py) and a process reward model (prm_train.py). `ppo_train.py --reward_model_path DIR` picks the
kind from the checkpoint's run_info.json (`--reward_model_type auto`) or from the flag (`rm | pm | prm`).

Both are callables `(prompts, responses) -> list[float]` (the interface `rlhfkit.rl.scoring.score` calls) and accept
`rlhfkit.rl.rewards.RewardInputs` too (the reward-source interface, `source(inputs)`), with `name`, `stats = None`
(their scores are not Bradley-Terry rewards with a training mean/std) and `describe()`.

Pairwise preference model, `PreferenceReward`: a sample is compared (both orders, rlhfkit.preference_model) with
- the other samples of its group when there are several (`--num_samples_per_prompt K > 1`: RLOO, GRPO, or any
  estimator run with K > 1; a group is the K consecutive rows of one draw of a prompt, so a prompt drawn twice in a
  batch is two groups): K(K−1)/2 comparisons per group, P(j ≻ i) = 1 − P(i ≻ j) by the two-order mean;
- otherwise (K = 1, and the held-out evaluation's single answer) the reference policy's greedy response to the
  prompt (generated once per prompt and cached).
Reward = the mean over its baselines of the log-odds log(P / (1 − P)) (`--pm_reward log_odds`, the default), or of
P itself (`win_rate`). Why log-odds: if the PM's preferences follow Bradley-Terry, logit P(i ≻ j) = r_i − r_j, so
the reward is r_i − r̄(baselines): the scalar reward a BT reward model would give, up to a per-prompt constant that
the advantage estimators remove (GAE's critic, RLOO's leave-one-out, GRPO's group mean). A win rate saturates at 0
and 1: once every sample clearly beats the baseline, "much better" and "slightly better" pay the same and the
signal vanishes. P is clipped to [1e-6, 1 − 1e-6] (|log-odds| ≤ 13.8); `--reward_clip` bounds it further.

Process reward model, `ProcessReward`: a response is split into steps by the PRM's step separator
(`rlhfkit.process_reward.split_steps`: every separator ends a step; empty pieces are not steps; the text is the
decoded response without special tokens) and each step scored P(+)_k in one forward. Rewards:
- critic-free group estimators (RLOO, GRPO): one score per response, the `--aggregate` of its step scores (min,
  last, prod, mean; a response without any step scores 0, the worst P);
- GAE and REINFORCE++ (`token_rewards`): log P(+)_k on the policy token that holds step k's last non-space
  character (found by decoding the sampled tokens prefix by prefix), nothing on the separator tokens or the stop
  token; the sequence score on the last token is then only the missing-EOS penalty. log P(+) so that the per-step
  rewards sum to log ∏ P(+)_k, the `prod` aggregate in log space: a wrong step costs much, a right one almost
  nothing, and writing more steps is never paid for in itself (raw P(+) at every step would pay for length). A
  response without any step gets log(1e-6) on its last token, as a step known to be wrong.
"""

from __future__ import annotations

import json
import math
import os

import torch

from rlhfkit.errors import UserError

REWARD_MODEL_TYPES = ("auto", "rm", "pm", "prm")
PM_REWARDS = ("log_odds", "win_rate")
LOG_EPS = 1e-6


def reward_model_kind(path: str, requested: str = "auto") -> str:
    """rm | pm | prm for a reward-model dir: from run_info.json (`auto`), checked against an explicit request."""
    from rlhfkit.preference_model import is_preference_model
    from rlhfkit.process_reward import is_process_reward_model

    if requested not in REWARD_MODEL_TYPES:
        raise UserError(f"--reward_model_type must be one of {', '.join(REWARD_MODEL_TYPES)}, not '{requested}'")
    found = "pm" if is_preference_model(path) else "prm" if is_process_reward_model(path) else "rm"
    if requested != "auto" and requested != found:
        what = {"rm": "a scalar reward model", "pm": "a pairwise preference model (pm_train.py)",
                "prm": "a process reward model (prm_train.py)"}
        raise UserError(f"{path}: --reward_model_type {requested}, but the checkpoint is {what[found]}")
    return found


def _split_inputs(args):
    if len(args) == 1:  # rlhfkit.rl.rewards.RewardInputs
        return args[0].prompts, args[0].responses
    return args[0], args[1]


def pm_reward_value(probability: float, how: str) -> float:
    p = min(max(probability, LOG_EPS), 1.0 - LOG_EPS)
    return math.log(p / (1.0 - p)) if how == "log_odds" else p


class PreferenceReward:
    stats = None

    def __init__(self, path: str, batch_size: int = 16, max_length: int | None = None, how: str = "log_odds"):
        from rlhfkit.preference_model import PreferenceModelScorer

        if how not in PM_REWARDS:
            raise UserError(f"--pm_reward must be one of {', '.join(PM_REWARDS)}, not '{how}'")
        self.scorer = PreferenceModelScorer(path, batch_size=batch_size, max_length=max_length)
        self.model = self.scorer.model
        self.name, self.path, self.how = path, path, how
        self.baseline_fn = None
        self.baselines: dict[str, str] = {}
        self.group_size = 1  # K, set by the stage: rows i·K … i·K+K−1 answer the same prompt


    def attach_reference(self, generate_greedy) -> None:
        """`generate_greedy(prompts) -> [response]`: the reference policy's greedy responses (the K = 1 baseline)."""
        self.baseline_fn = generate_greedy

    def __call__(self, *args) -> list[float]:
        prompts, responses = _split_inputs(args)
        keys = [json.dumps(p, sort_keys=True) for p in prompts]
        # a prompt's group: its run of consecutive rows, at most K long (rollouts are prompt-major); a prompt drawn
        # twice in one batch is two groups, never each other's baseline
        groups: list[list[int]] = []
        for i, key in enumerate(keys):
            if groups and keys[groups[-1][0]] == key and len(groups[-1]) < self.group_size:
                groups[-1].append(i)
            else:
                groups.append([i])
        comparisons, where = [], []
        missing = list(dict.fromkeys(keys[idx[0]] for idx in groups if len(idx) == 1 and keys[idx[0]] not in
                                     self.baselines))
        if missing:
            if self.baseline_fn is None:
                raise UserError("pairwise preference model as reward with one sample per prompt compares each sample "
                                "with the reference policy's greedy response, and none is available; use "
                                "--num_samples_per_prompt > 1 or give the reference as --ref_model_path")
            firsts = [prompts[keys.index(key)] for key in missing]
            for key, text in zip(missing, self.baseline_fn(firsts)):
                self.baselines[key] = text
        for idx in groups:
            if len(idx) == 1:
                i = idx[0]
                comparisons.append((prompts[i], responses[i], self.baselines[keys[i]]))
                where.append((i, None))
            else:
                for a in range(len(idx)):
                    for b in range(a + 1, len(idx)):
                        comparisons.append((prompts[idx[a]], responses[idx[a]], responses[idx[b]]))
                        where.append((idx[a], idx[b]))
        probabilities = self.scorer.compare(comparisons)
        totals = [0.0] * len(responses)
        counts = [0] * len(responses)
        for (i, j), p in zip(where, probabilities):
            totals[i] += pm_reward_value(p, self.how)
            counts[i] += 1
            if j is not None:  # P(j ≻ i) = 1 − P(i ≻ j) under the two-order mean
                totals[j] += pm_reward_value(1.0 - p, self.how)
                counts[j] += 1
        return [t / c for t, c in zip(totals, counts)]

    def describe(self) -> dict:
        return {"preference_model": os.path.abspath(self.path), "pm_reward": self.how,
                "baseline": "the other samples of the prompt (K > 1), else the reference policy's greedy response",
                "template": self.scorer.template.to_dict()}


def step_end_tokens(tokenizer, token_ids: list[int], text: str, ends: list[int]) -> list[int]:
    """Index in `token_ids` of the token that completes character offset end−1 of `text` (the decoded response),
    for each step end offset. Prefixes are decoded one token longer at a time (no special tokens), the way the
    response text was decoded."""
    out, t, decoded_length = [], 0, 0
    for end in ends:
        while t < len(token_ids) and decoded_length < end:
            decoded_length = len(tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True))
            t += 1
        out.append(max(t - 1, 0))
    return out


class ProcessReward:
    stats = None

    def __init__(self, path: str, batch_size: int = 8, max_length: int | None = None, aggregate: str = "min"):
        from rlhfkit.process_reward import ProcessRewardScorer

        self.scorer = ProcessRewardScorer(path, batch_size=batch_size, max_length=max_length, aggregate=aggregate)
        self.model = self.scorer.model
        self.name, self.path, self.how = path, path, aggregate
        self._last: tuple | None = None  # (responses, step scores) of the last call, reused by token_rewards

    def _steps(self, prompts, responses):
        key = (tuple(json.dumps(p, sort_keys=True) for p in prompts), tuple(responses))
        if self._last is None or self._last[0] != key:
            self._last = (key, self.scorer.steps(prompts, responses))
        return self._last[1]

    def __call__(self, *args) -> list[float]:
        from rlhfkit.process_reward import aggregate

        prompts, responses = _split_inputs(args)
        return [aggregate(s, self.how) if s else 0.0 for s in self._steps(prompts, responses)]

    def token_rewards(self, prompts, texts: list[str], responses: torch.Tensor, mask: torch.Tensor,
                      tokenizer) -> torch.Tensor:
        """[B, T] per-token rewards: log P(+)_k at each step's last token (see the module docstring)."""
        from rlhfkit.process_reward import split_steps

        scores = self._steps(prompts, texts)
        out = torch.zeros(mask.shape, dtype=torch.float32)
        for b, (text, values) in enumerate(zip(texts, scores)):
            length = int(mask[b].sum())
            ids = responses[b, :length].tolist()
            if not values:
                if length:
                    out[b, length - 1] = math.log(LOG_EPS)
                continue
            ends = [end for _, end in split_steps(text, self.scorer.format)][: len(values)]
            for position, value in zip(step_end_tokens(tokenizer, ids, text, ends), values):
                out[b, min(position, max(length - 1, 0))] += math.log(max(value, LOG_EPS))
        return out.to(mask.device)

    def describe(self) -> dict:
        return {"process_reward_model": os.path.abspath(self.path), "aggregate": self.how,
                "format": self.scorer.format.to_dict(),
                "token_rewards": "log P(+) at each step's last token (GAE, REINFORCE++)"}


def greedy_generator(model, tokenizer, max_new_tokens: int, stop_ids, suppressed=(), adapter_off: bool = False):
    """`prompts -> [greedy response text]` from `model` (the reference policy; with `adapter_off`, a PEFT policy with
    its adapter disabled, which is the reference under LoRA): the K = 1 baseline of `PreferenceReward`."""
    import contextlib

    from rlhfkit.sampling import generate_batch

    def generate(prompts):
        context = model.disable_adapter() if adapter_off else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), context:
                samples = generate_batch(model, tokenizer, prompts, 1, max_new_tokens, 0.0, 1.0, None,
                                         stop_ids=stop_ids, suppressed_tokens=suppressed)
        finally:
            model.train(was_training)
        return [s[0]["text"] for s in samples]

    return generate


def per_token_scores(raw: torch.Tensor, has_stop: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """The sequence score on the last token when a PRM's per-step rewards carry the reward: only the missing-EOS
    penalty (the steps are already paid for at their ends)."""
    scores = torch.zeros_like(raw, dtype=torch.float32)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_stop).float()
    return scores
