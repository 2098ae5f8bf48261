"""The stage scaffold, read from the sources (no imports, fast): a stage exports `ARGUMENTS`, the dataclass tuple its
`main` takes in order, runs `run_stage(main, ARGUMENTS)`, and its `main` returns its metrics (a dict)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every script that runs as a stage (calls run_stage), found from the sources so a new stage is checked without
# being listed; the known ones must stay among them
STAGES = sorted(str(path.relative_to(ROOT)) for pattern in ("*.py", "generation/*.py", "annotate/*.py", "rlhfkit/**/*.py")
                for path in ROOT.glob(pattern)
                if "run_stage(main" in (text := path.read_text(encoding="utf-8")) and "def run_stage" not in text)
KNOWN = {"sft_train.py", "rm_train.py", "dpo_train.py", "ppo_train.py", "eval_benchmark.py", "eval_winrate.py",
         "prepare_data.py", "generation/generate.py", "generation/merge_data.py", "annotate/get_rewards.py",
         "annotate/build_pairs.py", "rlhfkit/eval/report.py"}
# runs servers rather than writing a stage directory: its main returns the running set, not metrics
LAUNCHERS = {"generation/serve.py"}


def test_the_known_stages_are_found():
    assert KNOWN <= set(STAGES)


# not converted yet (their owners are changing them); each is checked as soon as it exports ARGUMENTS
PENDING: set[str] = set()  # every stage is converted


def _names(node: ast.AST) -> list[str]:
    return [ast.unparse(element) for element in node.elts] if isinstance(node, ast.Tuple) else [ast.unparse(node)]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_exports_its_arguments_and_main_returns_metrics(stage):
    tree = ast.parse((ROOT / stage).read_text(encoding="utf-8"))
    exported = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "ARGUMENTS" for t in node.targets)]
    if not exported:
        assert stage in PENDING, f"{stage}: no ARGUMENTS tuple"
        pytest.skip(f"{stage}: not converted yet")
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    required = main.args.args[: len(main.args.args) - len(main.args.defaults)]  # extra keywords have defaults
    taken = [ast.unparse(arg.annotation) if arg.annotation else None for arg in required]
    assert taken == _names(exported[0].value), f"{stage}: main's parameters differ from ARGUMENTS"
    returns = ast.unparse(main.returns) if main.returns is not None else ""
    if stage not in LAUNCHERS:
        assert returns.startswith("dict"), f"{stage}: main must return its metrics, not {returns or 'nothing'}"
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == "run_stage"]
    assert calls and all(ast.unparse(call.args[1]) == "ARGUMENTS" for call in calls), \
        f"{stage}: run_stage(main, ARGUMENTS)"
