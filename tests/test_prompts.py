"""rlhfkit.prompts.load_prompts: every accepted row format, stable ids, dedupe, one-line errors."""

from __future__ import annotations

import json

import pytest

from rlhfkit.errors import UserError
from rlhfkit.prompts import load_prompts, prompt_id


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_each_row_format(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "tell a story"},
        {"prompt": "be brief", "system": "you are terse"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {"instruction": "translate", "input": "bonjour"},
        {"question": "why is the sky blue?"},
    ])
    rows = load_prompts(path)
    assert [row["prompt"] for row in rows] == [
        [{"role": "user", "content": "tell a story"}],
        [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "be brief"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "how are you"}],  # the dataset's final answer is dropped
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        [{"role": "user", "content": "translate\n\nbonjour"}],
        [{"role": "user", "content": "why is the sky blue?"}],
    ]


def test_ids_given_or_content_hash_and_stable(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "a", "id": 17}, {"prompt": "b"}])
    first = load_prompts(path)
    assert first[0]["id"] == "17"
    assert first[1]["id"] == prompt_id([{"role": "user", "content": "b"}])
    reordered = write(tmp_path / "q.jsonl", [{"prompt": "b"}, {"prompt": "a", "id": 17}])
    assert {r["id"] for r in load_prompts(reordered)} == {r["id"] for r in first}


def test_duplicates_dropped_and_reported(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}, {"prompt": "x"}])
    b = write(tmp_path / "b.jsonl", [{"question": "y"}, {"prompt": "z"}])
    rows = load_prompts([a, b])
    assert [r["prompt"][0]["content"] for r in rows] == ["x", "y", "z"]
    assert rows.report[a] == {"read": 3, "dropped_duplicate": 1, "kept": 2}
    assert rows.report[b] == {"read": 2, "dropped_duplicate": 1, "kept": 1}


def test_same_id_different_prompt_is_refused(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "x", "id": 1}, {"prompt": "y", "id": 1}])
    with pytest.raises(UserError, match=r"p\.jsonl: row 2: field 'id': '1' is also the id of a different prompt"):
        load_prompts(path)


def test_prompts_of_a_preference_set(tmp_path):
    user = [{"role": "user", "content": "pick one"}]
    path = write(tmp_path / "pairs.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}], "id": "pair-1"},
        {"prompt": "pick one", "chosen": "c", "rejected": "d", "id": "pair-2"},
        {"chosen": "\n\nHuman: hello\n\nAssistant: hi", "rejected": "\n\nHuman: hello\n\nAssistant: go away"},
    ])
    rows = load_prompts(path)
    assert [r["prompt"] for r in rows] == [user, [{"role": "user", "content": "hello"}]]
    assert rows[0]["id"] == prompt_id(user)  # the pair's id names the pair, not the prompt
    assert rows.report[path]["dropped_duplicate"] == 1


def test_every_preference_format_is_read_as_a_preference_set(tmp_path):
    """rlhfkit.data decides what a preference row is: LMFlow positive/negative rows give their prompts too."""
    path = write(tmp_path / "lmflow.jsonl", [
        {"positive": "###System: Be brief.###Human: pick one###Assistant: a",
         "negative": "###System: Be brief.###Human: pick one###Assistant: b"},
    ])
    rows = load_prompts(path)
    assert [r["prompt"] for r in rows] == [[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "pick one"}]]
    assert rows.report[path]["format_preference"] == 1


def test_limits(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    assert [r["prompt"][0]["content"] for r in load_prompts(f"{path}:2")] == ["q0", "q1"]
    assert len(load_prompts(path, max_prompts=3)) == 3


@pytest.mark.parametrize("row, field, message", [
    ({"text": "no prompt field"}, "prompt", "missing"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "prompt", "alternate"),
    ({"messages": [{"role": "system", "content": "only system"}]}, "messages", "user turn"),
    ({"prompt": [{"role": "user"}]}, "prompt", "'role' and 'content'"),
    ({"question": 3}, "question", "must be a string"),
    ({"prompt": "   "}, "prompt", "empty content"),
])
def test_bad_rows_name_file_row_field(tmp_path, row, field, message):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(UserError, match=rf"bad\.jsonl: row 2: field '{field}': .*{message}") as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_skip_invalid_counts(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"text": "bad"}])
    rows = load_prompts(path, skip_invalid=True)
    assert len(rows) == 1 and rows.report[path]["skipped_invalid_prompt"] == 1


def test_missing_file_and_empty_set(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(str(empty))
