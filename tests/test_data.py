"""Preference data: each input format converts to the canonical schema; bad input fails with one clear line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhfkit.data import load_preferences, parse_hh_dialogue, parse_source, read_records, train_eval_split
from rlhfkit.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def one(path) -> dict:
    data = load_preferences([str(path)])
    assert len(data.rows) == 1
    return data.rows[0]


def test_rlhflow_conversations_split_at_shared_prompt():
    row = one(FIXTURES / "rlhflow.jsonl")
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["prompt"][-1]["content"] == "Tell me a joke."
    assert row["chosen"] == [{"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side."}]
    assert row["rejected"] == [{"role": "assistant", "content": "No."}]
    assert row["source"] == "rlhflow"


def test_explicit_prompt_messages_with_system_and_margin():
    row = one(FIXTURES / "explicit_messages.jsonl")
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert row["chosen"][0]["content"] == "4" and row["rejected"][0]["content"] == "5"
    assert row["margin"] == 1.5


def test_explicit_prompt_strings_json_list():
    row = one(FIXTURES / "explicit_strings.json")
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Paris."}]


def test_lmflow_instances():
    row = one(FIXTURES / "lmflow.json")
    assert row["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert row["chosen"][0]["content"] == "Put it in boiling water for 9 minutes."
    assert row["rejected"][0]["content"] == "Eggs are birds."


def test_hh_rlhf_raw_text():
    row = one(FIXTURES / "hh.jsonl")
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["prompt"][1]["content"] == "How about Whiskers?"
    assert row["chosen"][0]["content"] == "Perhaps Nebula."
    assert row["rejected"][0]["content"] == "Cat."


def test_rewardbench_row_keeps_subset_and_id():
    row = one(FIXTURES / "rewardbench.jsonl")
    assert row["subset"] == "alpacaeval-easy" and row["id"] == "17"
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["content"].startswith("Soft rain")


def test_gzip_parquet_and_directory(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "rlhflow.jsonl").read_text().splitlines()]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = {"prompt": ["Q?"], "chosen": ["yes"], "rejected": ["no"]}
    pq.write_table(pa.table(flat), tmp_path / "b.parquet")
    assert len(load_preferences([str(tmp_path / "a.jsonl.gz")]).rows) == 1
    assert load_preferences([str(tmp_path / "b.parquet")]).rows[0]["chosen"][0]["content"] == "yes"
    assert len(load_preferences([str(tmp_path)]).rows) == 2  # the directory reads both


def test_identical_pairs_dropped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "A"}, {"prompt": "Q", "chosen": "A", "rejected": "B"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_preferences([str(path)])
    assert len(data.rows) == 1
    assert data.report[str(path)] == {"read": 2, "dropped_identical": 1, "kept": 1}


def test_several_sources_with_counts_and_fractions(tmp_path):
    def write(name, n):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(n)))
        return str(path)

    first, second = write("first.jsonl", 10), write("second.jsonl", 8)
    data = load_preferences([f"{first}:3", f"{second}:0.5"], seed=1)
    sources = [row["source"] for row in data.rows]
    assert sources.count("first") == 3 and sources.count("second") == 4
    again = load_preferences([f"{first}:3", f"{second}:0.5"], seed=1)
    assert again.rows == data.rows  # seeded
    assert parse_source("x.jsonl:7").count == 7 and parse_source("x.jsonl:0.25").fraction == 0.25


def test_split_is_disjoint_and_seeded():
    rows = [{"i": i} for i in range(50)]
    train, held = train_eval_split(rows, 10, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert not {r["i"] for r in train} & {r["i"] for r in held}
    assert train_eval_split(rows, 10, seed=3) == (train, held)


def test_hh_parser_joins_doubled_turns_and_rejects_plain_text():
    messages = parse_hh_dialogue("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")
    assert messages == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    from rlhfkit.data import RowError

    with pytest.raises(RowError):
        parse_hh_dialogue("just some text")


# --- malformed input: one line naming file, row and field -------------------------------------------------------
BAD_ROWS = [
    ({"prompt": "Q", "chosen": "A"}, "field 'rejected'", "missing"),
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "field 'chosen'", "empty content"),
    ({"prompt": "  ", "chosen": "A", "rejected": "B"}, "field 'prompt'", "empty content"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}], "chosen": "A", "rejected": "B"},
     "field 'prompt'", "alternate"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "A", "rejected": "B"},
     "field 'prompt'", "end with a user turn"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}, "field 'chosen'", "'user'"),
    ({"prompt": "Q", "chosen": "A", "rejected": 5}, "field 'rejected'", "expected a string or a list"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}, "field 'margin'", "must be a number"),
    ({"prompt": [{"role": "robot", "content": "Q"}], "chosen": "A", "rejected": "B"}, "field 'prompt'", "unknown role"),
    ({"prompt": [{"content": "Q"}], "chosen": "A", "rejected": "B"}, "field 'prompt'", "'role' and 'content'"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "no dialogue here"}, "field 'rejected'", "no 'Human:'"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "field 'chosen'", "share no prompt"),
    ({"positive": "###Human: q###Assistant: a", "negative": "###Human: q###Assistant:   "}, "field 'negative'", "empty"),
]


@pytest.mark.parametrize("bad_row,field_text,reason", BAD_ROWS)
def test_malformed_row_names_file_row_and_field(tmp_path, capsys, bad_row, field_text, reason):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(UserError) as info:
        load_preferences([str(path)])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: row 2: {field_text}"), message
    assert reason in message, message
    # through the stage entry point: one line on stderr, exit code 2, no output dir
    import rm_train
    from rlhfkit.cli import run_stage

    with pytest.raises(SystemExit) as exit_info:
        run_stage(rm_train.main, rm_train.ARGUMENTS,
                  ["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(path),
                   "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err_lines == [f"error: {message}"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    skipped = load_preferences([str(path)], skip_invalid=True)
    assert len(skipped.rows) == 1 and sum(v for k, v in skipped.report[str(path)].items() if k.startswith("skipped")) == 1


def test_file_level_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"broken.jsonl: row 2: not valid JSON"):
        read_records(broken)
    with pytest.raises(UserError, match="file not found"):
        read_records(tmp_path / "missing.jsonl")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        read_records(odd)
    scalar = tmp_path / "rows.jsonl"
    scalar.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="row 1: each line must be a JSON object"):
        read_records(scalar)


# --- the format table: one place that recognises and converts each format -----------------------------------------
FORMAT_FIXTURES = {"explicit": "explicit_messages.jsonl", "hh_text": "hh.jsonl", "pair_messages": "rlhflow.jsonl",
                   "lmflow": "lmflow.json"}


def test_every_format_of_the_table_has_a_fixture_it_detects():
    from rlhfkit.data import PREFERENCE_FORMATS, detect_format, is_preference_row

    assert sorted(fmt.name for fmt in PREFERENCE_FORMATS) == sorted(FORMAT_FIXTURES)
    for name, fixture in FORMAT_FIXTURES.items():
        record = read_records(FIXTURES / fixture)[0]
        assert is_preference_row(record) and detect_format(record) == name, fixture
    assert not is_preference_row({"prompt": "q"}) and not is_preference_row({"chosen": "only one side"})
    assert not is_preference_row("not a row")


def test_detect_format_names_the_missing_side():
    from rlhfkit.data import RowError, detect_format

    for row, missing in (({"prompt": "q", "chosen": "a"}, "rejected"), ({"positive": "###Human: q"}, "negative"),
                         ({"rejected": "b"}, "chosen"), ({"text": "t"}, "chosen")):
        with pytest.raises(RowError) as info:
            detect_format(row)
        assert info.value.field == missing and "missing" in info.value.message


def test_lmflow_rows_load_exactly_as_rlhfkit_lmflow_reads_them(tmp_path):
    """One LMFlow parser: the preference loader keeps whitespace and a ###System: turn, like the converter."""
    from rlhfkit.mixtures.lmflow import export_pairs, import_pairs

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " two  spaces "}],
             "chosen": [{"role": "assistant", "content": "yes\n"}],
             "rejected": [{"role": "assistant", "content": " no"}]}]
    path = tmp_path / "rm.json"
    export_pairs(rows, path)
    loaded = load_preferences([str(path)]).rows
    assert [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in loaded] == rows == import_pairs(path)


def test_is_valid_prompt_is_the_turn_order_of_validate_turns():
    from rlhfkit.data import is_valid_prompt
    from rlhfkit.mixtures.sources import is_valid_prompt as sources_is_valid_prompt

    assert sources_is_valid_prompt is is_valid_prompt
    system, user, bot = ({"role": r, "content": "x"} for r in ("system", "user", "assistant"))
    assert is_valid_prompt([system, user, bot, user]) and is_valid_prompt([{"role": "user", "content": ""}])
    for bad in ([], [system], [user, user], [user, bot], [bot, user], [user, bot, system, user],
                [{"role": "tool", "content": "x"}, user]):
        assert not is_valid_prompt(bad), bad
