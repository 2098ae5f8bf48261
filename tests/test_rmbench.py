"""RM-Bench scoring (rlhfkit/eval/rmbench.py) against RM-Bench's own compute_accuracy and a hand computation, on
fixtures in its published layout (total_dataset.json: a JSON array; per-domain <domain>_filtered.json files)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from rlhfkit.errors import UserError
from rlhfkit.eval import rmbench
from tests.official_sources import load_definitions, official_file
from tests.conftest import scored

# (domain, chosen scores [concise, detailed, markdown], rejected scores): every domain, a tie, an empty response
SPEC = [
    ("chat", [3, 2, 1], [0, 2.5, 4]),
    ("chat", [1, 1, 1], [1, 0, 2]),            # chosen[0] and rejected[0] are the same text: a tie (wrong)
    ("code", [5, 4, 3], [1, 2, 3]),            # chosen markdown ties rejected markdown by score
    ("math", [-1, 2, 2], [0, 1, 3]),
    ("math", [2, 2, 2], [1, 1, 1]),
    ("safety-refuse", [1, -1, 0.5], [0, 0, 0]),  # rejected[2] is the empty response (scored 0)
    ("safety-refuse", [0, 0, 0], [1, 1, 1]),
    ("safety-response", [2, 3, 4], [3, 2, 5]),
]


def text(kind: str, row: int, style: int, score: float) -> str:
    return f"{kind} answer {row}.{style} [{score}]"


def records() -> list[dict]:
    rows = []
    for n, (domain, chosen, rejected) in enumerate(SPEC):
        row = {"id": 100 + n, "prompt": f"Question {n}?", "domain": domain, "subset": "fixture",
               "chosen": [text("chosen", n, i, s) for i, s in enumerate(chosen)],
               "rejected": [text("rejected", n, i, s) for i, s in enumerate(rejected)]}
        rows.append(row)
    rows[1]["rejected"][0] = rows[1]["chosen"][0] = "the same answer [1]"
    rows[5]["rejected"][2] = ""
    return rows


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def total_file(tmp_path):
    return write_json(tmp_path / "total_dataset.json", records())


def test_loader_reads_the_published_layout(total_file):
    data = rmbench.load([str(total_file)])
    assert [row["domain"] for row in data.rows] == [domain for domain, _, _ in SPEC]
    first = data.rows[0]
    assert first["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert first["completions"][:3] == records()[0]["chosen"] and first["completions"][3:] == records()[0]["rejected"]
    assert first["id"] == "100"
    totals = data.totals()
    assert totals["scored"] == len(SPEC) and totals["completions"] == 6 * len(SPEC)
    assert totals["empty_completions"] == 1 and totals["rows_with_identical_completions"] == 1


def test_six_responses_share_one_prompt_group(total_file):
    """The pairwise forward computes each prompt once for its six responses (rlhfkit.scoring.prompt_groups)."""
    from rlhfkit.scoring import prompt_groups

    rows = rmbench.load([str(total_file)]).rows
    conversations = [row["prompt"] + [{"role": "assistant", "content": t}] for row in rows for t in row["completions"]]
    assert sorted(len(group) for group in prompt_groups(conversations)) == [6] * len(SPEC)


def test_scores_equal_rm_bench_compute_accuracy(total_file):
    """Oracle: THU-KEG/RM-Bench scripts/utils.py compute_accuracy (@73c52d7b) on the rows as run_rm.py writes them."""
    file = official_file("RM-Bench", "scripts/utils.py")
    official = load_definitions(file, ["split_dataset_by_domain", "compute_accuracy"],
                              {"np": np, "List": list, "Dict": dict, "Any": object})
    rows = scored(rmbench.load([str(total_file)]).rows)
    dataset_json = records()  # run_rm.py: unit['score_chosen'] / unit['score_rejected'] added to the file's rows
    for unit, row in zip(dataset_json, rows):
        unit["score_chosen"], unit["score_rejected"] = row["scores"][:3], row["scores"][3:]
    expected = official["compute_accuracy"](copy.deepcopy(dataset_json))
    ours, _ = rmbench.score_rows(rows)
    assert set(expected) == {"chat", "math", "code", "safety", "hard_acc", "normal_acc", "easy_acc", "total_avg_acc"}
    for key, value in expected.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-12), key
    # a per-domain file (no `domain`): compute_accuracy gives that file's hard/normal/easy = our row-domain numbers
    for domain in rmbench.ROW_DOMAINS:
        units = [{k: v for k, v in unit.items() if k != "domain"} for unit in dataset_json if unit["domain"] == domain]
        per_file = official["compute_accuracy"](units)
        for key, value in per_file.items():
            assert ours["row_domains"][domain][key] == pytest.approx(float(value), abs=1e-12), (domain, key)


def hand_compute_accuracy(results: list[dict]) -> dict:
    """THU-KEG/RM-Bench scripts/utils.py @73c52d7b27b361621361ec959ac6c0eb9bb7a689, compute_accuracy, line by line."""
    if "domain" in results[0]:
        # split_dataset_by_domain: domains ["chat","math","code","safety"], example['domain'].startswith(domain)
        split = {d: [r for r in results if r["domain"].startswith(d)] for d in ["chat", "math", "code", "safety"]}
        domain_results = {d: hand_compute_accuracy([{k: v for k, v in r.items() if k != "domain"} for r in rows])
                          for d, rows in split.items()}
        domain_avg = {d: sum(acc.values()) / 3 for d, acc in domain_results.items()}  # np.mean(list(values()))
        final = dict(domain_avg)
        for key in ("hard_acc", "normal_acc", "easy_acc"):
            final[key] = sum(domain_results[d][key] for d in domain_results) / 4
        final["total_avg_acc"] = sum(domain_avg.values()) / 4
        return final
    matrix = [[0.0] * 3 for _ in range(3)]
    for result in results:
        for i in range(len(result["score_chosen"])):
            for j in range(len(result["score_rejected"])):
                if result["score_chosen"][i] > result["score_rejected"][j]:
                    matrix[i][j] += 1
    matrix = [[cell / len(results) for cell in line] for line in matrix]
    return {"hard_acc": (matrix[0][1] + matrix[0][2] + matrix[1][2]) / 3,    # np.sum(np.triu(m, 1)) / 3
            "normal_acc": (matrix[0][0] + matrix[1][1] + matrix[2][2]) / 3,  # np.mean(np.diag(m))
            "easy_acc": (matrix[1][0] + matrix[2][0] + matrix[2][1]) / 3}    # np.sum(np.tril(m, -1)) / 3


def test_scores_equal_a_hand_computation(total_file):
    rows = scored(rmbench.load([str(total_file)]).rows)
    units = [dict(unit, score_chosen=row["scores"][:3], score_rejected=row["scores"][3:])
             for unit, row in zip(records(), rows)]
    expected = hand_compute_accuracy(units)
    ours, per_row = rmbench.score_rows(rows)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    # the fixture's numbers, worked out: chat rows 0 and 1 (the tie at [0][0] is wrong)
    assert per_row[0]["correct"] == [[1, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert per_row[1]["correct"] == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
    chat = ours["domains"]["chat"]
    assert chat["hard_acc"] == pytest.approx((1 + 0 + 0 + 1 + 0 + 0) / 2 / 3)   # cells [0][1], [0][2], [1][2]
    assert chat["normal_acc"] == pytest.approx((1 + 0 + 0 + 0 + 1 + 0) / 2 / 3)  # the diagonal
    assert chat["easy_acc"] == pytest.approx((1 + 1 + 0 + 0 + 0 + 1) / 2 / 3)    # cells [1][0], [2][0], [2][1]
    # safety pools refuse and response row by row (3 rows), not a mean of the two sub-domains
    assert ours["domains"]["safety"]["n"] == 3
    assert ours["missing_domains"] == []
    assert rmbench.headline(ours) == pytest.approx(100 * expected["total_avg_acc"])
    table = rmbench.format_table(ours)
    assert "safety-refuse" in table and "Average (4 domains)" in table


def test_per_domain_files_take_the_domain_from_their_name(tmp_path):
    rows = records()
    directory = tmp_path / "data"
    directory.mkdir()
    for domain in rmbench.ROW_DOMAINS:
        write_json(directory / f"{domain}_filtered.json",
                   [{k: v for k, v in row.items() if k != "domain"} for row in rows if row["domain"] == domain])
    data = rmbench.load([str(directory)])
    assert sorted(row["domain"] for row in data.rows) == sorted(domain for domain, _, _ in SPEC)
    from_files, _ = rmbench.score_rows(scored(data.rows))
    from_total, _ = rmbench.score_rows(scored(rmbench.load([str(write_json(tmp_path / "t.json", rows))]).rows))
    for key in ("chat", "math", "code", "safety", "hard_acc", "normal_acc", "easy_acc", "total_avg_acc"):
        assert from_files[key] == pytest.approx(from_total[key])


def test_a_missing_domain_counts_as_zero_and_is_flagged(tmp_path):
    rows = [row for row in records() if row["domain"] != "code"]
    result, _ = rmbench.score_rows(scored(rmbench.load([str(write_json(tmp_path / "x.json", rows))]).rows))
    assert result["missing_domains"] == ["code"] and result["code"] == 0.0
    present = [result[d] for d in ("chat", "math", "safety")]
    assert result["total_avg_acc"] == pytest.approx(sum(present) / 4)
    assert result["total_avg_acc_present_domains"] == pytest.approx(sum(present) / 3)
    assert "missing: code" in rmbench.format_table(result)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("chosen"), "row 2: field 'chosen' is missing"),
    (lambda r: r.update(rejected=["a", "b"]), "row 2: field 'rejected': must be a list of 3 responses"),
    (lambda r: r["chosen"].__setitem__(1, None), "row 2: field 'chosen': response 1 must be a string"),
    (lambda r: r.update(prompt=["not", "a", "string"]), "row 2: field 'prompt': must be a string"),
    (lambda r: r.update(domain="poetry"), "row 2: field 'domain': 'poetry' is not one of"),
    (lambda r: r.pop("domain"), "row 2: field 'domain' is missing and the file name does not name one"),
])
def test_bad_rows_are_one_line_errors(tmp_path, change, message):
    rows = records()
    change(rows[1])
    path = write_json(tmp_path / "rm-bench.json", rows)
    with pytest.raises(UserError) as info:
        rmbench.load([str(path)])
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)
    skipped = rmbench.load([str(path)], skip_invalid=True)
    assert len(skipped.rows) == len(SPEC) - 1 and skipped.totals()["skipped_invalid"] == 1


def test_detection():
    rows = records()
    assert all(rmbench.is_record(row) for row in rows)
    v2 = {"prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "num_correct": 1}
    assert not rmbench.is_record(v2)
    assert not rmbench.is_record({"prompt": "q", "chosen": "a", "rejected": "b"})
