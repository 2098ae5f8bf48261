"""eval_benchmark.py end to end on RM-Bench, RMB and JudgeBench fixtures in their published layouts, and
`--benchmark all` over a directory of every benchmark: a tiny reward model built on the fly, its per-response scores
(scores.jsonl) fed back into the hand computations of the official scoring (tests/test_rmbench.py, test_rmb.py,
test_judgebench.py), and a rule-scored run whose numbers are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.errors import UserError
from tests import test_judgebench, test_rmb, test_rmbench
from tests.conftest import fake_score, write_jsonl

pytestmark = pytest.mark.slow


def run_eval(argv):
    import eval_benchmark
    from rlhfkit.cli import parse_args

    (args,) = parse_args((eval_benchmark.ScriptArguments,), argv)
    return eval_benchmark.main(args)


def announced_scores(model, tokenizer, conversations, *args, **kwargs):
    """Stands in for the reward model: each response scores what its text announces ("… [1.5]")."""
    return [fake_score(conversation[-1]["content"]) for conversation in conversations]


def write_benchmarks(root):
    """Every benchmark in its published layout under `root`, plus a plain preference file that is no benchmark."""
    rm_bench = root / "RM-Bench" / "data"
    rm_bench.mkdir(parents=True)
    rows = test_rmbench.records()
    (rm_bench / "total_dataset.json").write_text(json.dumps(rows))
    (rm_bench / "chat_filtered.json").write_text(json.dumps(
        [{k: v for k, v in row.items() if k != "domain"} for row in rows if row["domain"] == "chat"]))
    for category_path, items in test_rmb.fixture_files().items():
        path = root / "RMB_dataset" / f"{category_path}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
    judge = root / "JudgeBench" / "data"
    judge.mkdir(parents=True)
    for model in ("gpt-4o-2024-05-13", "claude-3-5-sonnet-20240620"):
        write_jsonl(judge / f"dataset=judgebench,response_model={model}.jsonl", test_judgebench.records())
    write_jsonl(root / "reward-bench" / "filtered.jsonl", [
        {"prompt": f"q{i}", "chosen": f"good answer [{i}]", "rejected": f"answer [{i - 1}]", "subset": subset,
         "id": str(i)} for i, subset in enumerate(["alpacaeval-easy", "hep-go", "refusals-dangerous", "math-prm"])])
    write_jsonl(root / "reward-bench-2" / "test.jsonl", [
        {"id": str(i), "prompt": f"q{i}", "chosen": [f"right [{i}]"], "rejected": [f"wrong [{j}]" for j in range(3)],
         "num_correct": 1, "total_completions": 4, "subset": subset}
        for i, subset in enumerate(["Factuality", "Precise IF", "Math", "Safety", "Focus"])])
    write_jsonl(root / "my-pairs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    return root


def scores_lines(output_dir):
    return [json.loads(line) for line in (output_dir / "scores.jsonl").read_text().splitlines()]


def test_each_benchmark_with_a_tiny_model_equals_the_official_computation(tmp_path, tiny_rm_dir):
    root = write_benchmarks(tmp_path / "data")
    common = ["--reward_model_path", str(tiny_rm_dir), "--batch_size", "4"]

    out = tmp_path / "rm-bench"
    results = run_eval(common + ["--dataset_path", str(root / "RM-Bench/data/total_dataset.json"),
                                 "--output_dir", str(out)])
    assert results["benchmark"] == "rm-bench" and results["rows"] == len(test_rmbench.SPEC)
    lines = scores_lines(out)
    units = [dict(unit, score_chosen=line["scores"][:3], score_rejected=line["scores"][3:])
             for unit, line in zip(test_rmbench.records(), lines)]
    expected = test_rmbench.hand_compute_accuracy(units)
    for key, value in expected.items():
        assert results["rm-bench"][key] == pytest.approx(value, abs=1e-12), key
    assert lines[1]["scores"][0] == lines[1]["scores"][3]  # the identical chosen/rejected texts: an exact tie
    assert results["diagnostics"]["batch_invariance"]["max_abs_diff"] < 1e-4
    assert results["accuracy_pairs_for_diagnostics"] == 9 * len(test_rmbench.SPEC)
    table = (out / "table.txt").read_text()
    assert "Average (4 domains)" in table and "ECE" in table and "Spearman" in table
    assert json.loads((out / "metrics.json").read_text())["score"] == pytest.approx(100 * expected["total_avg_acc"])

    out = tmp_path / "rmb"
    results = run_eval(common + ["--dataset_path", str(root / "RMB_dataset"), "--output_dir", str(out)])
    assert results["benchmark"] == "rmb"
    by_id = {line["id"]: line for line in scores_lines(out)}
    for (kind, goal), accuracy in _rmb_hand_sections(by_id).items():
        assert results["rmb"]["sections"][f"{kind} {goal}"]["accuracy"] == pytest.approx(accuracy)
    assert by_id["3"]["scores"][0] == by_id["3"]["scores"][1] and by_id["3"]["correct"] is False

    out = tmp_path / "judgebench"
    path = root / "JudgeBench/data/dataset=judgebench,response_model=gpt-4o-2024-05-13.jsonl"
    results = run_eval(common + ["--dataset_path", str(path), "--output_dir", str(out)])
    assert results["benchmark"] == "judgebench"
    lines = scores_lines(out)
    hand = [{"decisions": ["A>B" if a > b else "B>A", "B>A" if b > a else "A>B"], "label": record["label"],
             "source": record["source"]} for record, (a, b) in zip(test_judgebench.records(),
                                                                    [line["scores"] for line in lines])]
    assert results["judgebench"]["score"] == pytest.approx(test_judgebench.hand_final_metrics(hand, True))
    assert results["judgebench"]["score_single_game"] == pytest.approx(test_judgebench.hand_final_metrics(hand, False))
    assert lines[-1]["tie"] is True and lines[-1]["correct"] is False  # identical responses
    assert results["truncation"]["requested_max_length"] is None  # JudgeBench's judges do not truncate


def _rmb_hand_sections(by_id: dict) -> dict:
    """my_run_rm.py / run_rm_bestofn.py rules on scores.jsonl lines (see tests/test_rmb.py)."""
    sections: dict = {}
    for line in by_id.values():
        kind = "Pairwise" if line["subset"].startswith("Pairwise_set") else "BoN"
        goal = line["subset"].split("/")[1]
        best, others = line["scores"][0], line["scores"][1:]
        sections.setdefault((kind, goal), []).append(all(best > other for other in others))
    return {key: sum(values) / len(values) for key, values in sections.items()}


def test_rule_scored_runs_give_the_worked_out_numbers(tmp_path, monkeypatch, tiny_rm_dir):
    import numpy as np

    import rlhfkit.scoring

    monkeypatch.setattr(rlhfkit.scoring, "score_conversations", announced_scores)
    root = write_benchmarks(tmp_path / "data")
    common = ["--reward_model_path", str(tiny_rm_dir), "--calibration", "false", "--batch_invariance_rows", "0"]
    rmb = run_eval(common + ["--dataset_path", str(root / "RMB_dataset"), "--output_dir", str(tmp_path / "rmb")])
    assert rmb["rmb"]["score"] == pytest.approx(np.mean([2 / 4, 1 / 2, 1 / 3, 1.0]))  # tests/test_rmb.py
    judge = run_eval(common + ["--dataset_path", str(next((root / "JudgeBench/data").glob("*gpt-4o*"))),
                               "--output_dir", str(tmp_path / "jb")])
    assert (judge["judgebench"]["score"], judge["judgebench"]["score_single_game"]) == (50.0, 70.0)
    rm_bench = run_eval(common + ["--dataset_path", str(root / "RM-Bench/data/chat_filtered.json"),
                                  "--output_dir", str(tmp_path / "rmbench")])
    chat = rm_bench["rm-bench"]["domains"]["chat"]
    assert (chat["hard_acc"], chat["normal_acc"], chat["easy_acc"]) == pytest.approx((1 / 3, 1 / 3, 1 / 2))
    assert rm_bench["rm-bench"]["missing_domains"] == ["math", "code", "safety"]


def test_benchmark_all_gives_one_summary_table(tmp_path, tiny_rm_dir):
    root = write_benchmarks(tmp_path / "data")
    out = tmp_path / "all"
    results = run_eval(["--reward_model_path", str(tiny_rm_dir), "--benchmark", "all", "--dataset_path", str(root),
                        "--output_dir", str(out), "--batch_invariance_rows", "2"])
    names = [row["name"] for row in results["summary"]]
    assert names == ["v1", "v2", "rm-bench", "rmb", "judgebench-claude-3-5-sonnet-20240620",
                     "judgebench-gpt-4o-2024-05-13"]
    skipped = {Path(item["file"]).name: item["reason"] for item in results["skipped_files"]}
    assert set(skipped) == {"chat_filtered.json", "my-pairs.jsonl"}
    for row in results["summary"]:
        record = out / row["name"]
        assert (record / "table.txt").exists() and (record / "scores.jsonl").exists()
        assert row["score"] == pytest.approx(json.loads((record / "metrics.json").read_text())["score"])
    table = (out / "table.txt").read_text()
    for title in ("RewardBench v1", "RewardBench 2", "RM-Bench", "RMB", "JudgeBench (gpt-4o-2024-05-13)"):
        assert title in table
    assert "skipped" in table and json.loads((out / "metrics.json").read_text())["rmb"] == results["summary"][3]["score"]
    # the same model on one benchmark alone gives the same number
    alone = run_eval(["--reward_model_path", str(tiny_rm_dir), "--dataset_path", str(root / "RMB_dataset"),
                      "--output_dir", str(tmp_path / "alone"), "--batch_invariance_rows", "0", "--calibration", "false"])
    assert alone["rmb"]["score"] == pytest.approx(results["results"]["rmb"]["rmb"]["score"])


def test_dpo_implicit_reward_on_the_group_benchmarks(tmp_path, tiny_llama_dir):
    root = write_benchmarks(tmp_path / "data")
    same = run_eval(["--reward_model_path", str(tiny_llama_dir), "--ref_model_path", str(tiny_llama_dir),
                     "--benchmark", "all", "--dataset_path", str(root), "--output_dir", str(tmp_path / "dpo"),
                     "--calibration", "false", "--batch_invariance_rows", "2"])
    # π = π_ref: every implicit reward is 0, every comparison a tie, every benchmark 0 (RewardBench 2 is skipped)
    assert [row["benchmark"] for row in same["summary"]] == ["v1", "rm-bench", "rmb", "judgebench", "judgebench"]
    assert all(row["score"] == 0.0 for row in same["summary"])
    assert any("no DPO" in item["reason"] for item in same["skipped_files"])
    free = run_eval(["--reward_model_path", str(tiny_llama_dir), "--ref_free", "true", "--dataset_path",
                     str(root / "RMB_dataset"), "--output_dir", str(tmp_path / "free"), "--calibration", "false"])
    assert free["scoring"] == "implicit_reward_ref_free_avg" and free["completions"] == sum(
        len(line["scores"]) for line in scores_lines(tmp_path / "free"))
    assert free["diagnostics"]["batch_invariance"]["max_abs_diff"] < 1e-4


def test_bad_rows_stop_with_one_line(tmp_path, tiny_rm_dir):
    rows = test_judgebench.records()
    rows[3]["label"] = "tie"
    path = write_jsonl(tmp_path / "dataset=judgebench,response_model=x.jsonl", rows)
    with pytest.raises(UserError, match=r"row 4: field 'label': must be 'A>B' or 'B>A'"):
        run_eval(["--reward_model_path", str(tiny_rm_dir), "--benchmark", "judgebench", "--dataset_path", str(path),
                  "--output_dir", str(tmp_path / "out")])
