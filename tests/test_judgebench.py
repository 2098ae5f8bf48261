"""JudgeBench scoring of a reward model (rlhfkit/eval/judgebench.py) against JudgeBench's own judge and metrics code
and a hand computation, on a fixture in its published layout (data/dataset=judgebench,response_model=….jsonl)."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
from abc import ABC, abstractmethod

import pytest

from rlhfkit.errors import UserError
from rlhfkit.eval import judgebench
from tests.official_sources import load_definitions, official_file, statements
from tests.conftest import fake_score, scored


# (source, score A, score B, label): every category, an uncategorised source, ties either way, an empty response
SPEC = [
    ("mmlu-pro-law", 2, 1, "A>B"),
    ("mmlu-pro-computer science", 2, 1, "B>A"),
    ("mmlu-pro-math", 1, 1, "A>B"),          # tie: wrong in both orders and in one order (decides B>A)
    ("livebench-reasoning", 1, 1, "B>A"),    # tie: wrong in both orders, right in one order
    ("livebench-reasoning", 0, 3, "B>A"),
    ("livebench-math", None, -1, "A>B"),     # empty response A (scores 0) beats -1
    ("livecodebench", 5, 4, "B>A"),
    ("livecodebench", 1, 2, "B>A"),
    ("some-other-source", 1, 0, "A>B"),      # in Overall only, as run_judge.py's prefixes leave it out
]


def records() -> list[dict]:
    rows = []
    for n, (source, a, b, label) in enumerate(SPEC):
        rows.append({"pair_id": f"pair-{n}", "original_id": n if n % 2 else None, "source": source,
                     "question": f"Question {n}?", "response_model": "fixture-model",
                     "response_A": "" if a is None else f"answer A{n} [{a}]", "response_B": f"answer B{n} [{b}]",
                     "label": label})
    same = dict(rows[0], pair_id="pair-same", source="mmlu-pro-history", label="B>A")
    same["response_B"] = same["response_A"]  # identical responses, as one row of the Claude file: a forced tie
    return rows + [same]


@pytest.fixture
def judgebench_file(tmp_path):
    path = tmp_path / "dataset=judgebench,response_model=fixture-model.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in records()), encoding="utf-8")
    return path


def test_loader_reads_the_published_layout(judgebench_file):
    data = judgebench.load([str(judgebench_file)])
    assert len(data.rows) == len(SPEC) + 1
    first = data.rows[0]
    assert first["id"] == "pair-0" and first["label"] == "A>B" and first["category"] == "Knowledge"
    assert first["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert first["completions"] == ["answer A0 [2]", "answer B0 [1]"]
    assert data.rows[8]["category"] is None
    totals = data.totals()
    assert totals["empty_completions"] == 1 and totals["rows_with_identical_completions"] == 1


def load_official():
    """utils/metrics.py as is (it imports only typing); from utils/judges.py the `Judge` base and the `GRMReward`
    reward-model judge, taken out with `ast` (the module imports API clients, and one class imports transformers)."""
    spec = importlib.util.spec_from_file_location("judgebench_official_metrics",
                                                  official_file("JudgeBench", "utils/metrics.py"))
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    judges = load_definitions(official_file("JudgeBench", "utils/judges.py"), ["Judge", "GRMReward"],
                              {"ABC": ABC, "abstractmethod": abstractmethod, "Dict": dict, "Any": object})
    return metrics, judges


def test_scores_equal_judgebench_official_code(judgebench_file):
    """Oracle (ScalerLab/JudgeBench @e2c52c28): GRMReward.get_judgment's decision on our scores, run_judge.py's two
    orders (judgment 2 on (B, A)), utils/metrics.py compute_final_metrics per run_judge.py's source prefixes."""
    metrics, judges = load_official()
    run_judge = official_file("JudgeBench", "run_judge.py")
    loop = statements(run_judge, lambda n: isinstance(n, ast.For) and "compute_final_metrics" in ast.unparse(n),
                      function="main")
    prefixes = ast.literal_eval(loop[0].iter)
    assert prefixes == [prefix for _, prefix in judgebench.CATEGORIES] + [""]

    judge = object.__new__(judges["GRMReward"])  # no model: its get_reward returns our score of the assistant turn
    judge.model_name = "fixture"
    judge.get_reward = lambda message: fake_score(message[1]["content"])
    rows = scored(judgebench.load([str(judgebench_file)]).rows)
    pairs = {True: [], False: []}
    for record in records():
        question, response_a, response_b = record["question"], record["response_A"], record["response_B"]
        judgment_1 = asyncio.run(judge.get_judgment(question, response_a, response_b))
        judgment_2 = asyncio.run(judge.get_judgment(question, response_b, response_a))
        pairs[True].append(dict(record, judgments=[judgment_1, judgment_2]))
        pairs[False].append(dict(record, judgments=[judgment_1]))  # --single_game
    ours, per_row = judgebench.score_rows(rows)
    names = [name for name, _ in judgebench.CATEGORIES] + ["Overall"]
    for name, prefix in zip(names, prefixes):
        def include(pair, prefix=prefix):
            return pair["source"].startswith(prefix)

        assert ours["categories"][name]["score"] == pytest.approx(
            metrics.compute_final_metrics(pairs[True], True, include_fn=include)), name
        assert ours["categories"][name]["score_single_game"] == pytest.approx(
            metrics.compute_final_metrics(pairs[False], False, include_fn=include)), name
    for outcome, pair in zip(per_row, pairs[True]):
        decisions = [pair["judgments"][0]["decision"], metrics.flip_judgment(pair["judgments"][1]["decision"])]
        assert outcome["decisions"] == decisions


def hand_final_metrics(pairs: list[dict], reverse_order: bool) -> float:
    """ScalerLab/JudgeBench utils/metrics.py @e2c52c284e735e139b3daa61c206ee208f36c461, compute_final_metrics."""
    if not reverse_order:
        return 100 * sum(pair["decisions"][0] == pair["label"] for pair in pairs) / len(pairs)
    flip = {"A>B": "B>A", "B>A": "A>B"}
    n_correct = 0
    for pair in pairs:
        counter = 0
        for decision in pair["decisions"]:
            if decision == pair["label"]:
                counter += 1
            elif decision == flip[pair["label"]]:
                counter -= 1
        n_correct += counter > 0
    return 100 * n_correct / len(pairs)


def test_scores_equal_a_hand_computation(judgebench_file):
    """utils/judges.py @e2c52c28 (GRMReward, SkyworkReward, InternLM2Reward): 'A>B' if score1 > score2 else 'B>A';
    run_judge.py: judgment 2 on (B, A), flipped back by metrics.flip_judgment."""
    rows = scored(judgebench.load([str(judgebench_file)]).rows)
    hand = []
    for row in rows:
        a, b = row["scores"]
        decision_1 = "A>B" if a > b else "B>A"
        decision_2 = {"A>B": "B>A", "B>A": "A>B"}["A>B" if b > a else "B>A"]
        hand.append({"decisions": [decision_1, decision_2], "label": row["label"], "source": row["subset"]})
    ours, per_row = judgebench.score_rows(rows)
    assert [o["decisions"] for o in per_row] == [h["decisions"] for h in hand]
    for name, prefix in judgebench.CATEGORIES + (("Overall", ""),):
        members = [h for h in hand if h["source"].startswith(prefix)]
        assert ours["categories"][name]["score"] == pytest.approx(hand_final_metrics(members, True))
        assert ours["categories"][name]["score_single_game"] == pytest.approx(hand_final_metrics(members, False))
    # worked out: correct in both orders are rows 0, 4, 5, 7, 8 (ties 2, 3 and the identical pair are wrong);
    # in one order the B>A-labelled ties (3 and the identical pair) are right too
    assert [o["correct"] for o in per_row] == [True, False, False, False, True, True, False, True, True, False]
    assert ours["score"] == pytest.approx(100 * 5 / 10)
    assert ours["score_single_game"] == pytest.approx(100 * 7 / 10)
    assert ours["categories"]["Knowledge"]["n"] == 4 and ours["categories"]["Knowledge"]["ties"] == 2
    assert ours["categories"]["Reasoning"]["score"] == pytest.approx(50.0)
    assert ours["categories"]["Reasoning"]["score_single_game"] == pytest.approx(100.0)
    assert ours["uncategorised_sources"] == ["some-other-source"]
    assert judgebench.headline(ours) == ours["score"]
    table = judgebench.format_table(ours)
    assert "both orders" in table and "some-other-source" in table


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(label="A=B"), "field 'label': must be 'A>B' or 'B>A', got 'A=B'"),
    (lambda r: r.pop("label"), "field 'label': must be 'A>B' or 'B>A', got None"),
    (lambda r: r.pop("response_B"), "field 'response_B' is missing"),
    (lambda r: r.update(response_A=["x"]), "field 'response_A': must be a string, got list"),
    (lambda r: r.update(question=None), "field 'question': must be a string, got NoneType"),
    (lambda r: r.update(source=3), "field 'source': must be a string"),
])
def test_bad_rows_are_one_line_errors(tmp_path, change, message):
    rows = records()
    change(rows[2])
    path = tmp_path / "judgebench.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(UserError) as info:
        judgebench.load([str(path)])
    assert str(info.value).startswith(f"{path}: row 3: {message}")
    assert judgebench.load([str(path)], skip_invalid=True).totals()["skipped_invalid"] == 1


def test_detection():
    assert all(judgebench.is_record(row) for row in records())
    assert not judgebench.is_record({"prompt": "q", "chosen": "a", "rejected": "b"})
