"""rlhfkit.generations: one reader of generation rows with one id rule, stage-dir lookup, and its three users
(annotate/, eval_winrate.py, rlhfkit/eval/report_inputs.py) agreeing on it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from rlhfkit.checkpoints import INCOMPLETE_MARKER
from rlhfkit.errors import UserError
from rlhfkit.generations import GENERATIONS_FILE, REWARDS_FILE, read_generations, resolve_stage_file
from rlhfkit.prompts import load_prompts, prompt_id

ROOT = Path(__file__).resolve().parents[1]


def _user(text):
    return [{"role": "user", "content": text}]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [{"id": 7, "prompt": _user("given id"), "responses": ["a", "b"]},
        {"prompt": _user("no id"), "responses": ["c"]},
        {"prompt": "a string prompt", "responses": ["d"]}]


def test_one_id_rule_the_same_as_load_prompts(tmp_path):
    path = _write(tmp_path / "gen.jsonl", ROWS)
    rows = read_generations(path)
    assert [row["id"] for row in rows] == ["7", prompt_id(_user("no id")), prompt_id(_user("a string prompt"))]
    assert rows[2]["prompt"] == _user("a string prompt")
    assert rows.rows_without_id == [2, 3] and not rows.ids_given
    # a prompt set without ids gets the same ids, so generations of it match their prompts
    prompts = load_prompts(str(_write(tmp_path / "prompts.jsonl", [{"prompt": "no id"}])))
    assert prompts[0]["id"] == rows[1]["id"]


def test_rows_errors_name_file_row_field(tmp_path):
    cases = [
        ({"prompt": _user("q")}, "row 1: field 'responses': missing"),
        ({"prompt": [{"role": "user"}], "responses": ["a"]}, "row 1: field 'prompt': must be a non-empty list"),
        ({"prompt": _user("q") + [{"role": "assistant", "content": "a"}], "responses": ["a"]},
         "row 1: field 'prompt': must end with a user turn"),
        ({"prompt": _user("q"), "responses": []}, "row 1: field 'responses': must be a non-empty list of strings"),
    ]
    for number, (row, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{number}.jsonl", [row])
        with pytest.raises(UserError, match=message):
            read_generations(path)
    annotated = _write(tmp_path / "ann.jsonl",
                       [{"id": "x", "prompt": _user("q"), "responses": ["a"], "rewards": [1, 2]}])
    with pytest.raises(UserError, match="field 'rewards': must be a list of numbers, one per response"):
        read_generations(annotated, need_rewards=True)
    twice = _write(tmp_path / "twice.jsonl", [ROWS[1], ROWS[1]])
    with pytest.raises(UserError, match=r"row 2: field 'id': its prompt \(the id of a row without one\) repeats row 1"):
        read_generations(twice)
    same_id = _write(tmp_path / "same_id.jsonl", [ROWS[0], dict(ROWS[1], id="7")])
    with pytest.raises(UserError, match="row 2: field 'id': '7' repeats row 1"):
        read_generations(same_id)


def test_stage_dir_lookup_follows_the_stage_contract(tmp_path):
    done = tmp_path / "gen"
    _write(done / GENERATIONS_FILE, ROWS[:1])
    (done / "run_info.json").write_text(json.dumps({"complete": True, "stage": "generate"}))
    assert resolve_stage_file(done, GENERATIONS_FILE, "generation") == str(done / GENERATIONS_FILE)
    assert read_generations(done).path == str(done / GENERATIONS_FILE)
    with pytest.raises(UserError, match="annotation dir has no rewards.jsonl"):
        read_generations(done, need_rewards=True)

    marked = tmp_path / "marked"
    _write(marked / GENERATIONS_FILE, ROWS[:1])
    (marked / INCOMPLETE_MARKER).write_text("")
    said_incomplete = tmp_path / "said"
    _write(said_incomplete / REWARDS_FILE, ROWS[:1])
    (said_incomplete / "run_info.json").write_text(json.dumps({"complete": False}))
    for path, name in ((marked, GENERATIONS_FILE), (said_incomplete, REWARDS_FILE)):
        with pytest.raises(UserError, match="dir is incomplete"):
            resolve_stage_file(path, name, "generation")
    (tmp_path / "cut.partial").mkdir()
    with pytest.raises(UserError, match=r"cut: does not exist; .*cut.partial is an unfinished run"):
        resolve_stage_file(tmp_path / "cut", GENERATIONS_FILE, "generation")
    with pytest.raises(UserError, match="generation file not found"):
        resolve_stage_file(tmp_path / "nowhere.jsonl", GENERATIONS_FILE, "generation")


def test_annotate_winrate_and_report_read_rows_the_same_way(tmp_path):
    import eval_winrate
    from annotate import build_pairs
    from rlhfkit.eval import report_inputs

    path = _write(tmp_path / "gen.jsonl", ROWS)
    ids = [row["id"] for row in read_generations(path)]
    assert [row["id"] for row in build_pairs.read_rows(str(path), need_rewards=False)] == ids
    assert report_inputs.load_generations("base", str(path)).ids == ids
    judged = eval_winrate.read_generations(str(path), 0)
    assert [row["id"] for row in judged] == ["7", None, None]  # rows without their own id match by prompt
    pairs, counts = eval_winrate.match_rows(judged, judged, "auto", str(path), str(path))
    assert counts == {"matched_by": "prompt", "matched": 3, "only_in_a": 0, "only_in_b": 0}


def test_no_script_imports_a_sibling_script_and_names_are_defined_once():
    for script in (ROOT / "annotate").glob("*.py"):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name.split(".")[0] == "annotate"}, script.name
    from rlhfkit import models
    from rlhfkit.train import more

    assert more._REWARD_HEAD_NAMES is models.REWARD_HEAD_NAMES
