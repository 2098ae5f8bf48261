"""rlhfkit.pairs: each strategy on rows with known rewards, ties and margins counted, statistics by hand."""

from __future__ import annotations

import math

import pytest

from rlhfkit.pairs import build_pairs, reward_statistics, select_pair

PROMPT = [{"role": "user", "content": "q"}]


def row(row_id, rewards):
    return {"id": row_id, "prompt": PROMPT, "responses": [f"{row_id}{i}" for i in range(len(rewards))],
            "rewards": rewards}


ROWS = [
    row("a", [1.0, 3.0, 2.0]),  # best a1, worst a0, margin 2
    row("b", [0.5, 0.5]),  # all tied
    row("c", [2.0, 2.0, 1.0]),  # best shared by c0 and c1: the first (c0) wins; worst c2, margin 1
    row("d", [5.0]),  # one response: no pair possible
]


def sides(pair):
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def test_max_min():
    pairs, sft, report = build_pairs(ROWS, "max_min")
    assert [(p["id"], *sides(p), p["margin"]) for p in pairs] == [("a", "a1", "a0", 2.0), ("c", "c0", "c2", 1.0)]
    assert dict(report.dropped) == {"ties": 1, "too_few_responses": 1}
    assert pairs[0]["prompt"] == PROMPT and pairs[0]["chosen"][0]["role"] == "assistant"
    assert report.to_dict()["mean_margin"] == pytest.approx(1.5)


def test_min_margin_drops_and_counts():
    pairs, sft, report = build_pairs(ROWS, "max_min", min_margin=1.5)
    assert [p["id"] for p in pairs] == ["a"]
    assert dict(report.dropped) == {"ties": 1, "too_few_responses": 1, "below_min_margin": 1}
    assert [s["id"] for s in sft] == ["a", "d"]  # c: spread 1 < 1.5; b: tied
    assert dict(report.sft_dropped) == {"ties": 1, "below_min_margin": 1}


def test_max_random_chosen_is_best_rejected_is_another():
    outcomes = set()
    for seed in range(30):
        pairs, _, report = build_pairs(ROWS, "max_random", seed=seed)
        by_id = {p["id"]: p for p in pairs}
        assert sides(by_id["a"])[0] == "a1" and sides(by_id["a"])[1] in {"a0", "a2"}
        assert "b" not in by_id
        if "c" in by_id:  # c0 vs c2 kept; c0 vs c1 is a tie and dropped
            assert sides(by_id["c"]) == ("c0", "c2") and by_id["c"]["margin"] == 1.0
            outcomes.add("c-pair")
        else:
            assert report.dropped["ties"] == 2
            outcomes.add("c-tie")
        outcomes.add(sides(by_id["a"])[1])
        again, _, _ = build_pairs(ROWS, "max_random", seed=seed)
        assert again == pairs
    assert outcomes == {"a0", "a2", "c-pair", "c-tie"}  # both branches of the draw were seen


def test_random_orders_by_reward():
    seen = set()
    for seed in range(30):
        pairs, _, report = build_pairs(ROWS, "random", seed=seed)
        for pair in pairs:
            source = next(r for r in ROWS if r["id"] == pair["id"])
            rewards = dict(zip(source["responses"], source["rewards"]))
            chosen, rejected = sides(pair)
            assert chosen != rejected and rewards[chosen] - rewards[rejected] == pair["margin"] > 0
            seen.add((chosen, rejected))
        assert report.dropped["ties"] >= 1  # b always ties
    assert {("a1", "a0"), ("a1", "a2"), ("a2", "a0")} <= seen


def test_best_of_k_writes_no_pairs():
    pairs, sft, report = build_pairs(ROWS, "best_of_k")
    assert pairs == [] and report.pairs == 0
    assert [(s["id"], s["messages"][-1]["content"], s["reward"]) for s in sft] == [
        ("a", "a1", 3.0), ("c", "c0", 2.0), ("d", "d0", 5.0)]
    assert sft[0]["messages"] == PROMPT + [{"role": "assistant", "content": "a1"}]
    assert dict(report.sft_dropped) == {"ties": 1}


def test_select_pair_edge_cases():
    import random

    assert select_pair([1.0], "max_min", random.Random(0)) is None
    assert select_pair([3.0, 1.0, 3.0, 1.0], "max_min", random.Random(0)) == (0, 1)
    with pytest.raises(ValueError):
        select_pair([1.0, 2.0], "best_of_k", random.Random(0))
    with pytest.raises(ValueError):
        build_pairs(ROWS, "max_max")
    with pytest.raises(ValueError, match="row 0"):
        build_pairs([{"id": "x", "prompt": PROMPT, "responses": ["a", "b"], "rewards": [1.0, math.nan]}], "max_min")


def test_reward_statistics_by_hand():
    stats = reward_statistics([[1.0, 3.0, 2.0], [0.5, 0.5], [4.0]])
    # values 0.5 0.5 1 2 3 4: mean 11/6; spreads 2, 0, 0
    assert stats["responses"] == 6 and stats["prompts"] == 3
    assert stats["mean"] == pytest.approx(11 / 6)
    assert stats["std"] == pytest.approx(math.sqrt(sum((x - 11 / 6) ** 2 for x in [0.5, 0.5, 1, 2, 3, 4]) / 6))
    assert stats["median"] == pytest.approx(1.5)
    assert stats["p25"] == pytest.approx(0.625)  # position 1.25 between 0.5 and 1.0
    assert (stats["min"], stats["max"]) == (0.5, 4.0)
    assert stats["mean_spread"] == pytest.approx(2 / 3)
    assert stats["all_tied_prompts"] == 1
