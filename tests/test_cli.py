"""Arguments: YAML < CLI precedence, unknown keys fatal, one-line errors with exit code 2."""

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from rlhfkit.cli import parse_args, run_stage
from rlhfkit.errors import UserError
from tests.conftest import REPO


@dataclass
class Args:
    learning_rate: float = 1e-5
    name: str = "x"
    paths: list[str] = field(default=None)
    flag: bool = False


def test_yaml_then_cli_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.001\nname: from-yaml\npaths: [a, b]\nflag: true\n")
    (args,) = parse_args([Args], ["--config", str(config), "--name", "from-cli"])
    assert args.learning_rate == 0.001 and args.name == "from-cli" and args.paths == ["a", "b"] and args.flag is True


def test_unknown_yaml_key_is_fatal_with_suggestion(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match=r"c.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_args([Args], ["--config", str(config)])


def test_unknown_flag_is_fatal():
    with pytest.raises(UserError, match="unknown argument '--nmae'.*did you mean 'name'"):
        parse_args([Args], ["--nmae", "y"])


def test_run_stage_prints_one_line_and_exits_2(capsys):
    def main(args):
        raise UserError("data.jsonl: row 3: field 'chosen': is empty")

    with pytest.raises(SystemExit) as info:
        run_stage(main, [Args], [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data.jsonl: row 3: field 'chosen': is empty\n"


@pytest.mark.slow  # starts a Python process per script (~12 s each here): kept out of make test-fast
@pytest.mark.parametrize("script", ["rm_train.py", "eval_benchmark.py"])
def test_help_works(script):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--output_dir" in result.stdout or "--record_dir" in result.stdout


@dataclass
class RenamedArgs:
    reward_model_path: str = None
    ref_model_path: str = None
    output_dir: str = None


def test_old_flag_names_still_work_with_a_note(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("ref_model_name_or_path: ref\n")
    (args,) = parse_args([RenamedArgs], ["--config", str(config), "--reward_name_or_path", "rm",
                                         "--record_dir=out"])
    assert (args.reward_model_path, args.ref_model_path, args.output_dir) == ("rm", "ref", "out")
    notes = capsys.readouterr().err
    assert "'reward_name_or_path' is deprecated, use 'reward_model_path'" in notes
    assert "c.yaml: key 'ref_model_name_or_path' is deprecated, use 'ref_model_path'" in notes
    assert "'record_dir' is deprecated, use 'output_dir'" in notes


def test_an_old_name_a_stage_still_declares_is_left_alone():
    @dataclass
    class Old:
        reward_name_or_path: str = None

    (args,) = parse_args([Old], ["--reward_name_or_path", "rm"])
    assert args.reward_name_or_path == "rm"
