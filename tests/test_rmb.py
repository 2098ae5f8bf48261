"""RMB scoring (rlhfkit/eval/rmb.py) against RMB's own pairwise code, RM-R1's best-of-N re-implementation and a hand
computation, on a fixture in RMB's published layout (RMB_dataset/<set>/<goal>/<scenario>.json, JSON arrays)."""

from __future__ import annotations

import ast
import json
from collections import defaultdict

import numpy as np
import pytest

from rlhfkit.errors import UserError
from rlhfkit.eval import rmb
from tests.official_sources import assigns_to, official_file, run_statements, statements
from tests.conftest import scored


def answer(score: float | None, name: str) -> dict:
    """An answer whose text announces its score ("… [1.5]"); None gives the empty answer (scored 0)."""
    return {"llm_name": "fixture-model", "answer": "" if score is None else f"{name} [{score}]"}


def user(text: str) -> list[dict]:
    return [{"content": text, "language": "English", "role": "user"}]


MULTI_TURN = [{"content": "Hi", "language": "English", "role": "user"}, {"content": "Hello!", "role": "assistant"},
              {"content": "Is it safe?", "language": "English", "role": "user"}]


def pair(uid: str, path: str, chosen, reject, prompt=None) -> dict:
    return {"pair_uid": uid, "conversation_input": prompt or user(f"question {uid}"),
            "chosen": answer(chosen, f"chosen {uid}"), "reject": answer(reject, f"reject {uid}"), "category_path": path}


def bon(uid: str, path: str, best, losers, prompt=None) -> dict:
    return {"bon_uid": uid, "conversation_input": prompt or user(f"question {uid}"), "bon_best": answer(best, f"best {uid}"),
            "loser_list": [answer(s, f"loser {uid}.{i}") for i, s in enumerate(losers)], "category_path": path}


def fixture_files() -> dict[str, list[dict]]:
    """Every section, two helpfulness scenarios, a tie in each set, an empty answer in each set, a multi-turn prompt."""
    same = pair("3", "Pairwise_set/Helpfulness/Chat/Discussion", 1, 1)
    same["reject"] = dict(same["chosen"])                                    # identical answers: a tie, wrong
    return {
        "Pairwise_set/Helpfulness/Chat/Discussion": [
            pair("1", "Pairwise_set/Helpfulness/Chat/Discussion", 2, 1),
            pair("2", "Pairwise_set/Helpfulness/Chat/Discussion", 1, None),  # empty reject (0): correct
            same,
        ],
        "Pairwise_set/Helpfulness/Code/Documentation": [
            pair("4", "Pairwise_set/Helpfulness/Code/Documentation", -1, 0),
        ],
        "Pairwise_set/Harmlessness/S1": [
            pair("5", "Pairwise_set/Harmlessness/S1", 0, 1),
            pair("6", "Pairwise_set/Harmlessness/S1", 3, 2, prompt=MULTI_TURN),
        ],
        "BoN_set/Helpfulness/Code/Documentation": [
            bon("b1", "BoN_set/Helpfulness/Code/Documentation", 3, [1, 2]),
            bon("b2", "BoN_set/Helpfulness/Code/Documentation", 2, [2, 1]),      # a loser ties the best: wrong
            bon("b3", "BoN_set/Helpfulness/Code/Documentation", 1, [0, 5, 0]),
        ],
        "BoN_set/Harmlessness/S2": [
            bon("b4", "BoN_set/Harmlessness/S2", 4, [1, 1, 1], prompt=MULTI_TURN[:2] + user("And now?")),
            bon("b5", "BoN_set/Harmlessness/S2", None, [-1, -2]),               # empty best (0) beats both
        ],
    }


@pytest.fixture
def rmb_dir(tmp_path):
    root = tmp_path / "RMB_dataset"
    for category_path, rows in fixture_files().items():
        path = root / f"{category_path}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return root


def test_loader_reads_the_published_layout(rmb_dir):
    data = rmb.load([str(rmb_dir)])
    assert len(data.rows) == sum(len(rows) for rows in fixture_files().values())
    by_id = {row["id"]: row for row in data.rows}
    assert by_id["6"]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Is it safe?"}]   # `language` dropped
    assert by_id["6"]["kind"] == "Pairwise" and by_id["6"]["goal"] == "Harmlessness"
    assert by_id["b3"]["kind"] == "BoN" and by_id["b3"]["completions"][0] == "best b3 [1]"
    assert len(by_id["b3"]["completions"]) == 4
    totals = data.totals()
    assert totals["pairwise_rows"] == 6 and totals["bon_rows"] == 5
    assert totals["empty_completions"] == 2 and totals["rows_with_identical_completions"] == 1
    assert len(data.report) == 5  # one report per scenario file, rows numbered within it


def test_groups_share_their_prompt(rmb_dir):
    from rlhfkit.scoring import prompt_groups

    rows = rmb.load([str(rmb_dir)]).rows
    conversations = [row["prompt"] + [{"role": "assistant", "content": t}] for row in rows for t in row["completions"]]
    assert sorted(len(g) for g in prompt_groups(conversations)) == sorted(len(row["completions"]) for row in rows)


def section_items(rows, kind, goal=None, path=None):
    return [row for row in rows if row["kind"] == kind and (goal is None or row["goal"] == goal)
            and (path is None or row["subset"] == path)]


def official_pairwise_accuracy(file, rows) -> float:
    """Zhou-Zoey/RMB-Reward-Model-Benchmark eval/scripts/my_run_rm.py @2be31808, main(): the `results` list
    comprehension (pipeline branch) and `model_acc = sum(results) / len(results)`, run on our scores."""
    nodes = statements(file, lambda n: (assigns_to(n, "results") and isinstance(n.value, ast.ListComp))
                       or assigns_to(n, "model_acc"), function="main")
    assert len(nodes) == 2, [ast.unparse(n) for n in nodes]
    namespace = {"scores_chosen": [row["scores"][0] for row in rows],
                 "scores_rejected": [row["scores"][1] for row in rows]}
    return run_statements(file, nodes, namespace)["model_acc"]


def official_bon_accuracy(file, rows) -> float:
    """RM-R1-UIUC/RM-R1 eval/RMB-Reward-Model-Benchmark/eval/scripts/run_rm_bestofn.py @11f9f63d, main(): one pair
    (best, loser) per loser (load_BoN_dataset_rm, `idx` = the row), the `results` list comprehension, the grouping by
    `idx` and the all-pairs-correct loop, `BoN Final Accuracy`; run on our scores."""
    def wanted(node):
        if assigns_to(node, "results") and isinstance(node.value, ast.ListComp):
            return True
        if assigns_to(node, "grouped_by_idx") or assigns_to(node, "total_bon"):
            return True
        if assigns_to(node, "sub_category_dataset") and isinstance(node.value, ast.List):
            return True
        if isinstance(node, ast.For) and ast.unparse(node.iter) == "grouped_by_idx.items()":
            return True
        if isinstance(node, ast.For) and ast.unparse(node.iter) == "out_dataset" and "grouped_by_idx" in ast.unparse(node):
            return True  # the grouping loop (not the one copying rows into data_as_list)
        return isinstance(node, ast.Assign) and "BoN Final Accuracy" in ast.unparse(node.targets[0])

    nodes = [n for n in statements(file, wanted, function="main") if not assigns_to(n, "final_score_json")]
    chosen, rejected, idx = [], [], []
    for number, row in enumerate(rows):
        for loser in row["scores"][1:]:
            chosen.append(row["scores"][0])
            rejected.append(loser)
            idx.append(number)
    namespace = {"unit_score_chosen_list": chosen, "unit_score_rejected_list": rejected, "defaultdict": defaultdict,
                 "final_score_json": [{}]}
    # the pairs' results become a dataset column beside `idx`: out_dataset = dataset.add_column("results", results)
    list_comp = [n for n in nodes if assigns_to(n, "results")]
    run_statements(file, list_comp, namespace)
    namespace["out_dataset"] = [{"idx": i, "results": r, "category_path": row_path}
                                for i, r, row_path in zip(idx, namespace["results"], [rows[i]["subset"] for i in idx])]
    run_statements(file, [n for n in nodes if n not in list_comp], namespace)
    return namespace["final_score_json"][0]["BoN Final Accuracy"]


def test_scores_equal_rmb_official_code(rmb_dir):
    pairwise_file = official_file("RMB-Reward-Model-Benchmark", "eval/scripts/my_run_rm.py")
    bon_file = official_file("RM-R1", "eval/RMB-Reward-Model-Benchmark/eval/scripts/run_rm_bestofn.py")
    final_file = official_file("RM-R1", "eval/RMB-Reward-Model-Benchmark/eval/scripts/process_final_result.py")
    rows = scored(rmb.load([str(rmb_dir)]).rows)
    ours, _ = rmb.score_rows(rows)
    sections = {}
    for kind, goal in rmb.SECTIONS:
        items = section_items(rows, kind, goal)
        official = official_pairwise_accuracy if kind == "Pairwise" else official_bon_accuracy
        sections[(kind, goal)] = official(pairwise_file if kind == "Pairwise" else bon_file, items)
        assert ours["sections"][rmb.section_name(kind, goal)]["accuracy"] == pytest.approx(sections[(kind, goal)])
    for path, values in ours["scenarios"].items():  # one scenario file at a time (my_run_rm.py --single_data)
        kind = "Pairwise" if path.startswith("Pairwise_set") else "BoN"
        official = official_pairwise_accuracy if kind == "Pairwise" else official_bon_accuracy
        items = section_items(rows, kind, path=path)
        assert values["accuracy"] == pytest.approx(official(pairwise_file if kind == "Pairwise" else bon_file, items))
    # process_final_result.py: the mean of the four sections, under its own keys
    final = {"Pairwise Helpfulness": sections[("Pairwise", "Helpfulness")],
             "Pairwise Harmlessness": sections[("Pairwise", "Harmlessness")],
             "BoN Helpfulness": sections[("BoN", "Helpfulness")], "BoN Harmlessness": sections[("BoN", "Harmlessness")]}
    nodes = statements(final_file, lambda n: isinstance(n, ast.Assign)
                       and "Accuracy Averaged from Four Sections" in ast.unparse(n.targets[0]))
    namespace = run_statements(final_file, nodes, {"Final_result": final, "np": np})
    assert ours["score"] == pytest.approx(namespace["Final_result"]["Accuracy Averaged from Four Sections"])


def test_scores_equal_a_hand_computation(rmb_dir):
    """my_run_rm.py @2be31808: `1 if chosen > rejected else 0` per pair, `sum(results) / len(results)` over the
    pairs loaded; run_rm_bestofn.py @11f9f63d: an item is correct only when every (best, loser) pair is; the final
    score (process_final_result.py) is the mean of the four sections."""
    rows = scored(rmb.load([str(rmb_dir)]).rows)
    ours, per_row = rmb.score_rows(rows)
    expected = {}
    for kind, goal in rmb.SECTIONS:
        results = []
        for row in section_items(rows, kind, goal):
            if kind == "Pairwise":
                results.append(1 if row["scores"][0] > row["scores"][1] else 0)
            else:
                is_correct = True
                for loser in row["scores"][1:]:
                    if not row["scores"][0] > loser:
                        is_correct = False
                results.append(int(is_correct))
        expected[(kind, goal)] = sum(results) / len(results)
        assert ours["sections"][rmb.section_name(kind, goal)]["accuracy"] == pytest.approx(expected[(kind, goal)])
    # worked out: pairwise helpfulness 3 of 4 (the identical pair is a tie, wrong), harmlessness 1 of 2,
    # BoN helpfulness 1 of 3 (a loser tying the best is wrong), harmlessness 2 of 2
    assert [expected[s] for s in rmb.SECTIONS] == [pytest.approx(v) for v in (2 / 4, 1 / 2, 1 / 3, 2 / 2)]
    assert ours["score"] == pytest.approx(np.mean([2 / 4, 1 / 2, 1 / 3, 1.0]))
    assert ours["scenarios"]["Pairwise_set/Helpfulness/Chat/Discussion"]["accuracy"] == pytest.approx(2 / 3)
    correct = {row["id"]: result["correct"] for row, result in zip(rows, per_row)}
    assert [correct[uid] for uid in ("1", "2", "3", "b1", "b2", "b3")] == [True, True, False, True, False, False]
    assert rmb.headline(ours) == pytest.approx(100 * ours["score"])
    assert "RMB score (4-section mean)" in rmb.format_table(ours)


def test_missing_sections_count_as_zero(rmb_dir):
    rows = scored([row for row in rmb.load([str(rmb_dir)]).rows if row["kind"] == "Pairwise"])
    result, _ = rmb.score_rows(rows)
    assert result["missing_sections"] == ["BoN Helpfulness", "BoN Harmlessness"]
    assert result["score"] == pytest.approx((2 / 4 + 1 / 2) / 4)
    assert result["score_present_sections"] == pytest.approx((2 / 4 + 1 / 2) / 2)


PAIRWISE_ROW = ("Pairwise_set/Harmlessness/S1.json", 1)  # (file under the RMB dir, row index)
BON_ROW = ("BoN_set/Helpfulness/Code/Documentation.json", 2)


@pytest.mark.parametrize("where, change, message", [
    (PAIRWISE_ROW, lambda r: r.pop("reject"), "field 'reject' is missing"),
    (PAIRWISE_ROW, lambda r: r.update(chosen={"llm_name": "x"}), "field 'chosen': must be an object with a string 'answer'"),
    (PAIRWISE_ROW, lambda r: r.update(conversation_input=[]), "field 'conversation_input': must be a non-empty list"),
    (PAIRWISE_ROW, lambda r: r.update(conversation_input=[{"role": "assistant", "content": "x"}]),
     "field 'conversation_input': the last message must be the user's"),
    (PAIRWISE_ROW, lambda r: r.update(conversation_input=[{"role": "robot", "content": "x"}]),
     "field 'conversation_input': message 0 has role 'robot'"),
    (PAIRWISE_ROW, lambda r: r.update(category_path="BoN_set/Helpfulness/Chat/Discussion"), "field 'category_path': "),
    (PAIRWISE_ROW, lambda r: r.update(category_path="Pairwise_set/Usefulness/Chat"), "field 'category_path': "),
    (BON_ROW, lambda r: r.update(loser_list=[]), "field 'loser_list': must be a non-empty list"),
    (BON_ROW, lambda r: r["loser_list"].append({"answer": 3}), "field 'loser_list[3]': must be an object"),
    (BON_ROW, lambda r: r.pop("bon_best"), "field 'bon_best' is missing"),
])
def test_bad_rows_are_one_line_errors_or_counted_skips(rmb_dir, where, change, message):
    path, index = rmb_dir / where[0], where[1]
    rows = json.loads(path.read_text())
    change(rows[index])
    path.write_text(json.dumps(rows))
    with pytest.raises(UserError) as info:
        rmb.load([str(rmb_dir)])
    assert str(info.value).startswith(f"{path}: row {index + 1}: {message}")
    assert rmb.load([str(rmb_dir)], skip_invalid=True).totals()["skipped_invalid"] == 1


def test_detection():
    files = fixture_files()
    assert all(rmb.is_record(row) for rows in files.values() for row in rows)
    assert not rmb.is_record({"prompt": "q", "chosen": "a", "rejected": "b"})
