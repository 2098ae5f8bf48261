"""RewardBench 2 scoring against hand computations (rlhfkit/rewardbench2.py) and through eval_benchmark.py."""

import json
import math

import pytest

from rlhfkit.eval import rewardbench2 as rb2
from rlhfkit.errors import UserError
from tests.conftest import write_jsonl


def test_best_of_n_with_tie_credit():
    assert rb2.best_of_n_result([3, 1, 2, 0]) == 1.0
    assert rb2.best_of_n_result([3, 3, 1, 0]) == 0.5
    assert rb2.best_of_n_result([2, 2, 2, 2]) == 0.25
    assert rb2.best_of_n_result([1, 3, 0, 0]) == 0.0
    assert rb2.best_of_n_result([1, 1, 3, 1]) == 0.0  # first ties others but not the top


def ties_rows():
    return [
        {"id": "ref:1", "scores": [5, 1, 2], "num_correct": 1},        # margin 3, accurate
        {"id": "tied:1", "scores": [4, 3, 1, 2], "num_correct": 2},    # spread 1, margin 1, accurate
        {"id": "ref:2", "scores": [1, 2], "num_correct": 1},           # margin -1
        {"id": "tied:2", "scores": [5, 1, 2], "num_correct": 2},       # spread 4, margin -1
        {"id": "ref:3", "scores": [10, 2], "num_correct": 1},          # margin 8
        {"id": "tied:3", "scores": [10, 9, 1], "num_correct": 2},      # spread 1, margin 8
        {"id": "ref:4", "scores": [3, 1], "num_correct": 1},           # margin 2
        {"id": "tied:4", "scores": [3, 3, 1], "num_correct": 2},       # spread 0, margin 2: x/0 = inf, tanh → 1
    ]


def test_ties_score_by_hand():
    result = rb2.ties_score(ties_rows())
    assert result["ref_accuracy"] == pytest.approx(3 / 4)
    assert result["tied_accuracy"] == pytest.approx(3 / 4)
    # tied margin > spread: [1>1, -1>4, 8>1, 2>0] ; min(ref, tied) margins [1, -1, 8, 2] > spread: same
    assert result["correctness_preferred"] == pytest.approx(2 / 4)
    assert result["correctness_preferred_hard"] == pytest.approx(2 / 4)
    margin = (math.tanh(1 / 1 - 1) + math.tanh(-1 / 4 - 1) + math.tanh(8 / 1 - 1) + 1.0) / 4
    assert result["correctness_margin_score"] == pytest.approx(margin)
    expected = 0.30 * 0.75 + 0.30 * 0.75 + 0.20 * 0.5 + 0.20 * 0.5 + 0.01 * margin
    assert result["score"] == pytest.approx(expected)
    assert result["prompts_with_both"] == 4


def test_ties_zero_over_zero_margin_counts_0():
    rows = [{"id": "ref:1", "scores": [1, 1], "num_correct": 1}, {"id": "tied:1", "scores": [1, 1, 1], "num_correct": 2}]
    result = rb2.ties_score(rows)  # margins 0, spread 0: tanh(0/0 - 1) is NaN → 0
    assert result["correctness_margin_score"] == 0.0
    assert result["score"] == pytest.approx(0.0)


def test_tied_row_with_one_correct_is_an_error():
    with pytest.raises(UserError, match="tied:1"):
        rb2.ties_score([{"id": "ref:1", "scores": [2, 1], "num_correct": 1},
                        {"id": "tied:1", "scores": [2, 1], "num_correct": 1}])


def test_row_validation():
    good = {"id": "5", "prompt": "p", "chosen": ["a"], "rejected": ["b", "c"], "num_correct": 1,
            "total_completions": 3, "subset": "Math"}
    assert rb2.v2_row(good, "f: row 1")["completions"] == ["a", "b", "c"]
    with pytest.raises(UserError, match="total_completions"):
        rb2.v2_row({**good, "total_completions": 4}, "f: row 1")
    with pytest.raises(UserError, match="'id'"):
        rb2.v2_row({**good, "subset": "Ties", "id": "7"}, "f: row 1")
    assert rb2.is_v2_record(good) and not rb2.is_v2_record({"chosen": "a", "rejected": "b"})


def test_summary_is_the_mean_of_six_subsets_missing_as_zero():
    per_subset = {"Factuality": {"score": 0.5, "n": 2}, "Math": {"score": 1.0, "n": 1}, "Ties": {"score": 0.4, "n": 2}}
    result = rb2.summary(per_subset)
    assert result["score"] == pytest.approx((50 + 100 + 40) / 6)
    assert result["missing_subsets"] == ["Precise IF", "Safety", "Focus"]
    assert result["score_present_subsets"] == pytest.approx((50 + 100 + 40) / 3)


def _rule_scores(model, tokenizer, conversations, *args, **kwargs):
    return [float(conv[-1]["content"].count("good")) for conv in conversations]


@pytest.mark.slow  # runs the stage's main to the end
def test_eval_benchmark_v2_by_hand(tmp_path, monkeypatch, tiny_llama_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rlhfkit.scoring
    from tests.test_rewardbench import run_eval

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(rm)
    monkeypatch.setattr(rlhfkit.scoring, "score_conversations", _rule_scores)

    def row(i, subset, chosen, rejected, num_correct=1, row_id=None):
        return {"id": row_id or str(i), "prompt": f"q{i}", "chosen": chosen, "rejected": rejected,
                "num_correct": num_correct, "total_completions": len(chosen) + len(rejected), "subset": subset}

    g = lambda k: "good " * k + "x"  # noqa: E731 - score k
    rows = [
        row(0, "Factuality", [g(3)], [g(1), g(2), g(0)]),        # 1
        row(1, "Factuality", [g(2)], [g(2), g(1), g(0)]),        # tie of 2 at the top: 0.5
        row(2, "Precise IF", [g(1)], [g(2), g(0), g(0)]),        # 0
        row(3, "Math", [g(1)], [g(1), g(1), g(1)]),              # 4-way tie: 0.25
        row(4, "Safety", [""], ["", g(0), g(0)]),                # empty completions, all score 0: 0.25
        row(5, "Focus", [g(2)], [g(1), g(1), g(1)]),             # 1
    ] + [row(6 + i, "Ties", [g(s) for s in r["scores"][: r["num_correct"]]],
             [g(s) for s in r["scores"][r["num_correct"]:]], r["num_correct"], r["id"]) for i, r in enumerate(ties_rows())]
    path = write_jsonl(tmp_path / "rb2.jsonl", rows)
    results = run_eval(["--reward_model_path", str(rm), "--dataset_path", str(path),
                        "--output_dir", str(tmp_path / "eval")])
    assert results["benchmark"] == "v2"
    per = results["per_subset"]
    assert per["Factuality"]["score"] == pytest.approx(0.75)
    assert per["Precise IF"]["score"] == 0.0 and per["Math"]["score"] == 0.25 and per["Safety"]["score"] == 0.25
    ties = rb2.ties_score(ties_rows())["score"]
    assert per["Ties"]["score"] == pytest.approx(ties)
    expected = 100 * (0.75 + 0 + 0.25 + 0.25 + 1 + ties) / 6
    assert results["rewardbench2"]["score"] == pytest.approx(expected)
    assert results["empty_completions"] == 2
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["score"] == pytest.approx(expected)
    table = (tmp_path / "eval" / "table.txt").read_text()
    assert "Score (6-subset mean)" in table and "Spearman" in table and "ECE" in table
    scored = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert scored[1]["result"] == 0.5 and scored[6]["result"] is None
    # forced v1 on v2 rows is a clear error, not a traceback
    with pytest.raises(UserError):
        run_eval(["--reward_model_path", str(rm), "--dataset_path", str(path), "--output_dir",
                  str(tmp_path / "e2"), "--benchmark", "v1"])
