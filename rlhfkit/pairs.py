"""From K scored responses per prompt to DPO pairs and best-of-K SFT rows (pure functions, no I/O).

Strategies (`--pair_strategy`), for one prompt with rewards r_1..r_K:
    max_min      chosen = the highest reward, rejected = the lowest (Online-RLHF / RLHFlow's choice)
    max_random   chosen = the highest, rejected = one of the other K−1 drawn uniformly (`best_vs_random_other`,
                 the draw of the mixtures' `best_vs_random` too; see there for how their tie rules differ)
    random       two distinct responses drawn uniformly; the higher-rewarded one is chosen
    best_of_k    no pairs; only the best-of-K SFT rows (rejection sampling)
Ties: when the argmax is shared, the first response with that reward is "the highest" (deterministic), likewise
for the lowest. A pair whose two rewards are equal carries no preference and is dropped and counted as a tie; a pair
with margin r_chosen − r_rejected < `min_margin` is dropped and counted separately.

Best-of-K SFT rows use the highest-rewarded response per prompt, kept when max − min ≥ `min_margin` and the
rewards are not all equal (all equal: nothing says it is better than the others; counted as a tie).

Random draws use `random.Random(derive_seed(seed, id))`, so a prompt's pair does not depend on file order.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

PAIR_STRATEGIES = ("max_min", "max_random", "random", "best_of_k")


@dataclass
class PairReport:
    prompts: int = 0
    pairs: int = 0
    sft_rows: int = 0
    dropped: Counter = field(default_factory=Counter)  # ties, below_min_margin, too_few_responses (pairs)
    sft_dropped: Counter = field(default_factory=Counter)
    margins: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        mean_margin = sum(self.margins) / len(self.margins) if self.margins else None
        return {
            "prompts": self.prompts,
            "pairs": self.pairs,
            "sft_rows": self.sft_rows,
            "pairs_dropped": dict(self.dropped),
            "sft_dropped": dict(self.sft_dropped),
            "mean_margin": mean_margin,
        }


def _argmax(rewards: Sequence[float]) -> int:
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def _argmin(rewards: Sequence[float]) -> int:
    return min(range(len(rewards)), key=lambda i: (rewards[i], i))


def best_vs_random_other(scores: Sequence[float | None], rng: random.Random,
                         strictly_worse: bool = False) -> tuple[int, int] | None:
    """(best, other): the first response with the top score vs one drawn uniformly from the other scored ones.

    None scores take no part; None with fewer than two scored responses. `strictly_worse`: draw among the responses
    scored below the best when there are any (all equal: the draw is a tie whatever happens). A tied draw is left
    to the caller, and the two callers treat it differently:
      - annotate (`--pair_strategy max_random`, `build_pairs` here): a tied draw is always dropped and counted as
        `ties`; the generator is `random.Random(derive_seed(seed, prompt id))`.
      - the RLHFlow mixtures (`sources.pairs_best_vs_random`): `--ties drop` (the published rule) drops it, `keep`
        keeps it, `resample` draws with `strictly_worse=True`; the generator is seeded by (seed, source, row key).
    """
    scored = [index for index, score in enumerate(scores) if score is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda index: scores[index])  # max() keeps the first of equal maxima
    others = [index for index in scored if index != best]
    if strictly_worse:
        others = [index for index in others if scores[index] < scores[best]] or others
    return best, rng.choice(others)


def select_pair(rewards: Sequence[float], strategy: str, rng: random.Random) -> tuple[int, int] | None:
    """(chosen index, rejected index) for one prompt, before tie/margin filtering; None with < 2 responses."""
    if strategy not in PAIR_STRATEGIES or strategy == "best_of_k":
        raise ValueError(f"not a pair strategy: {strategy!r} (use max_min, max_random or random)")
    if len(rewards) < 2:
        return None
    if strategy == "max_min":
        return _argmax(rewards), _argmin(rewards)
    if strategy == "max_random":
        return best_vs_random_other(rewards, rng)
    first, second = rng.sample(range(len(rewards)), 2)
    return (first, second) if rewards[first] >= rewards[second] else (second, first)


def _check_rewards(row: dict, index: int) -> list[float]:
    rewards, responses = row.get("rewards"), row.get("responses")
    if not isinstance(rewards, list) or not isinstance(responses, list) or len(rewards) != len(responses):
        raise ValueError(f"row {index}: 'rewards' and 'responses' must be lists of the same length")
    if any(not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) for r in rewards):
        raise ValueError(f"row {index}: 'rewards' must be numbers (no NaN)")
    return [float(r) for r in rewards]


def build_pairs(
    rows: Sequence[dict], strategy: str, min_margin: float = 0.0, seed: int = 42
) -> tuple[list[dict], list[dict], PairReport]:
    """DPO pairs and best-of-K SFT rows from annotated rows `{"id", "prompt", "responses", "rewards"}`.

    Returns (pairs in the canonical preference schema with `margin`, SFT rows `{"messages", "id", "reward"}`,
    report). `strategy == "best_of_k"` returns no pairs.
    """
    from .sampling import derive_seed  # imports torch; prepare_data uses best_vs_random_other without it

    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {', '.join(PAIR_STRATEGIES)}")
    report = PairReport()
    pairs: list[dict] = []
    sft: list[dict] = []
    for index, row in enumerate(rows):
        rewards = _check_rewards(row, index)
        responses = row["responses"]
        report.prompts += 1
        row_id = str(row.get("id", index))

        # best-of-K SFT row
        if len(rewards) == 0:
            report.sft_dropped["no_responses"] += 1
        elif len(rewards) > 1 and max(rewards) == min(rewards):
            report.sft_dropped["ties"] += 1
        elif len(rewards) > 1 and max(rewards) - min(rewards) < min_margin:
            report.sft_dropped["below_min_margin"] += 1
        else:
            best = _argmax(rewards)
            sft.append(
                {
                    "messages": list(row["prompt"]) + [{"role": "assistant", "content": responses[best]}],
                    "id": row_id,
                    "reward": rewards[best],
                }
            )

        if strategy == "best_of_k":
            continue
        selected = select_pair(rewards, strategy, random.Random(derive_seed(seed, row_id)))
        if selected is None:
            report.dropped["too_few_responses"] += 1
            continue
        chosen, rejected = selected
        margin = rewards[chosen] - rewards[rejected]
        if margin == 0:
            report.dropped["ties"] += 1
            continue
        if margin < min_margin:
            report.dropped["below_min_margin"] += 1
            continue
        pairs.append(
            {
                "prompt": list(row["prompt"]),
                "chosen": [{"role": "assistant", "content": responses[chosen]}],
                "rejected": [{"role": "assistant", "content": responses[rejected]}],
                "margin": margin,
                "id": row_id,
            }
        )
        report.margins.append(margin)
    report.pairs, report.sft_rows = len(pairs), len(sft)
    return pairs, sft, report


def reward_statistics(rewards_per_prompt: Sequence[Sequence[float]]) -> dict:
    """Summary of annotated rewards: over all responses, and the within-prompt spread that pairs feed on.

    `spread` is max − min per prompt (the max_min margin); `all_tied_prompts` have no usable preference.
    """
    flat = sorted(float(r) for rewards in rewards_per_prompt for r in rewards)
    if not flat:
        return {"responses": 0}
    count = len(flat)
    mean = sum(flat) / count
    std = math.sqrt(sum((r - mean) ** 2 for r in flat) / count)

    def quantile(q: float) -> float:  # linear interpolation between order statistics
        position = q * (count - 1)
        low = math.floor(position)
        high = min(low + 1, count - 1)
        return flat[low] + (flat[high] - flat[low]) * (position - low)

    spreads = [max(r) - min(r) for r in rewards_per_prompt if len(r) > 0]
    return {
        "responses": count,
        "prompts": len(rewards_per_prompt),
        "mean": mean,
        "std": std,
        "min": flat[0],
        "p25": quantile(0.25),
        "median": quantile(0.5),
        "p75": quantile(0.75),
        "max": flat[-1],
        "mean_spread": sum(spreads) / len(spreads) if spreads else None,
        "all_tied_prompts": sum(1 for r in rewards_per_prompt if len(r) > 1 and max(r) == min(r)),
    }
