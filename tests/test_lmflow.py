"""LMFlow ↔ canonical rows: the paired {"instances": [{"positive", "negative"}]} and SFT text_only formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prepare_data import ScriptArguments, main
from rlhfkit.errors import UserError
from rlhfkit.mixtures.lmflow import (
    export_pairs,
    export_sft,
    import_pairs,
    import_sft,
    instance_to_pair,
    pair_to_instance,
    parse_text,
    render_text,
)
from rlhfkit.mixtures.lmflow import main as lmflow_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "recipes"


def msg(role, content):
    return {"role": role, "content": content}


def test_import_paired_fixture():
    rows = import_pairs(FIXTURES / "lmflow_pairs.json")
    assert rows == [
        {"prompt": [msg("user", "Are space heaters safe?"), msg("assistant", "What do you mean?"),
                    msg("user", "Can they be a fire hazard?")],
         "chosen": [msg("assistant", "Yes, if placed near curtains.")],
         "rejected": [msg("assistant", "No.")]},
        {"prompt": [msg("system", "Be brief."), msg("user", "how do i make forts at home?")],
         "chosen": [msg("assistant", "Drape a blanket over two chairs.")],
         "rejected": [msg("assistant", "Buy a tent.")]},
    ]


def test_export_writes_lmflow_text_and_round_trips(tmp_path):
    rows = [{"prompt": [msg("user", " leading space"), msg("assistant", "two\n\nlines"), msg("user", "")],
             "chosen": [msg("assistant", "yes ")], "rejected": [msg("assistant", "no")], "source": "x", "id": "1"}]
    assert pair_to_instance(rows[0]) == {
        "positive": "###Human:  leading space###Assistant: two\n\nlines###Human: ###Assistant: yes ",
        "negative": "###Human:  leading space###Assistant: two\n\nlines###Human: ###Assistant: no"}
    path = tmp_path / "rm.json"
    assert export_pairs(rows, path) == 1
    assert set(json.loads(path.read_text())) == {"instances"}  # LMFlow's paired files carry no "type"
    assert import_pairs(path) == [{k: rows[0][k] for k in ("prompt", "chosen", "rejected")}]


def test_sft_text_only_round_trip(tmp_path):
    rows = import_sft(FIXTURES / "lmflow_sft.json")
    assert rows[1] == {"messages": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"),
                                    msg("assistant", "Goodbye.")]}
    path = tmp_path / "sft.json"
    export_sft(rows, path)
    payload = json.loads(path.read_text())
    assert payload["type"] == "text_only"
    assert payload["instances"] == json.loads((FIXTURES / "lmflow_sft.json").read_text())["instances"]
    assert import_sft(path) == rows


def test_errors_name_file_instance_and_field(tmp_path):
    with pytest.raises(UserError, match=r"field 'negative': its dialogue before the reply differs"):
        instance_to_pair({"positive": "###Human: a###Assistant: b", "negative": "###Human: c###Assistant: d"},
                         ("rm.json", 3))
    with pytest.raises(UserError, match=r"^rm.json: row 0: field 'positive': missing"):
        instance_to_pair({"negative": "###Human: a###Assistant: b"}, ("rm.json", 0))
    with pytest.raises(UserError, match="must end with an '###Assistant:' reply"):
        instance_to_pair({"positive": "###Human: a", "negative": "###Human: a"}, ("rm.json", 0))
    with pytest.raises(UserError, match="text before the first"):
        parse_text("hello ###Human: a")
    with pytest.raises(UserError, match="contains an LMFlow role tag"):
        render_text([msg("user", "say ###Assistant: hi")])
    with pytest.raises(UserError, match="not paired positive/negative data"):
        import_pairs(FIXTURES / "lmflow_sft.json")
    with pytest.raises(UserError, match="expected 'text_only'"):
        import_sft(FIXTURES / "lmflow_pairs.json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"instances": [{"text": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.json: byte 28: not valid UTF-8"):
        import_sft(latin1)
    with pytest.raises(UserError, match="is a directory"):
        import_pairs(tmp_path)


@pytest.mark.slow
def test_prepare_data_imports_and_exports_lmflow(tmp_path):
    manifest = main(ScriptArguments(output_dir=str(tmp_path / "out"), lmflow_path=[str(FIXTURES / "lmflow_pairs.json")],
                                    export_lmflow=True))
    assert manifest["sources"]["lmflow"]["kept"] == 2
    out_rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").open()]
    assert [row["id"] for row in out_rows] == ["lmflow:1", "lmflow:2"]
    exported = json.loads((tmp_path / "out" / "pairs.lmflow.json").read_text())
    assert exported == json.loads((FIXTURES / "lmflow_pairs.json").read_text())


def test_command_line_converter(tmp_path, capsys):
    target = tmp_path / "pairs.jsonl"
    lmflow_cli(["import", "pairs", str(FIXTURES / "lmflow_pairs.json"), str(target)])
    back = tmp_path / "back.json"
    lmflow_cli(["export", "pairs", str(target), str(back)])
    assert json.loads(back.read_text()) == json.loads((FIXTURES / "lmflow_pairs.json").read_text())
    assert "wrote 2 rows" in capsys.readouterr().out
