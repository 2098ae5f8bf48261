"""RewardBench v1 numbers against RewardBench's own code, not a transcription of it.

The oracle is the PyPI package `rewardbench==0.1.4` (the release whose `rewardbench/constants.py` EXAMPLE_COUNTS
match allenai/reward-bench main since commit 6552e93), installed without its dependencies:

    .venv/bin/pip install --no-deps rewardbench==0.1.4

Its package `__init__` imports fastchat, torch-heavy model code and the hub, so nothing is imported through it: the
pure pieces are read from the installed files and run here on the per-row scores `eval_benchmark.py` wrote
(`scores.jsonl`):
- `rewardbench/constants.py` (EXAMPLE_COUNTS, SUBSET_MAPPING): loaded as a module by file path;
- `rewardbench/utils.py` `calculate_scores_per_section`: the function definition alone;
- `rewardbench/rewardbench.py` `rewardbench()`: the exact statements that turn scores into per-pair results
  (`results.append(1) if chosen > rejected else …`) and results into per-subset accuracies (`results_grouped`);
- `analysis/get_benchmark_results.py` (shipped in the same wheel) `get_average_over_rewardbench`: the legacy score
  (sections and Prior weighted 2,2,2,2,1, Prior masked when absent).
The 4-section Score is the plain mean of the official section scores (the leaderboard's "Score").
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from rlhfkit.eval.rewardbench import EXAMPLE_COUNTS, PRIOR_SETS, SECTIONS, WEIGHTS_SOURCE
from tests.conftest import write_jsonl




def _installed(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # a top-level find_spec does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed: .venv/bin/pip install --no-deps rewardbench==0.1.4")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    assert path.is_file(), f"{path} is missing from the installed rewardbench wheel"
    return path


def _tree(file: Path) -> ast.Module:
    return ast.parse(file.read_text(encoding="utf-8"))


def load_functions(file: Path, names: list[str], namespace: dict) -> None:
    """Execute the named top-level function definitions of `file` in `namespace` (the file's imports are not run)."""
    found = [node for node in _tree(file).body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {node.name for node in found} == set(names), f"{file} no longer defines {names}"
    exec(compile(ast.Module(body=found, type_ignores=[]), str(file), "exec"), namespace)


def statements(file: Path, function: str, match) -> list[ast.stmt]:
    """The statements inside `function` of `file` for which `match(node)` holds, in source order."""
    scope = next(node for node in _tree(file).body if isinstance(node, ast.FunctionDef) and node.name == function)
    return sorted((node for node in ast.walk(scope) if isinstance(node, ast.stmt) and match(node)),
                  key=lambda node: node.lineno)


def run_statements(file: Path, nodes: list[ast.stmt], namespace: dict) -> None:
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(file), "exec"), namespace)


def _assigns(node: ast.stmt, name: str) -> bool:
    return isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)


@pytest.fixture(scope="module")
def official():
    """RewardBench 0.1.4's scoring pieces, from the installed files."""
    from importlib.metadata import version

    import numpy as np
    import pandas as pd

    assert version("rewardbench") == "0.1.4"
    spec = importlib.util.spec_from_file_location("rewardbench_constants_0_1_4",
                                                  _installed("rewardbench", "constants.py"))
    constants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constants)  # pure dicts, no imports
    namespace = {"np": np, "pd": pd, "EXAMPLE_COUNTS": constants.EXAMPLE_COUNTS,
                 "SUBSET_MAPPING": constants.SUBSET_MAPPING, "logger": logging.getLogger("rewardbench-oracle")}
    load_functions(_installed("rewardbench", "utils.py"), ["calculate_scores_per_section"], namespace)
    load_functions(_installed("analysis", "get_benchmark_results.py"), ["get_average_over_rewardbench"], namespace)
    main = _installed("rewardbench", "rewardbench.py")
    compare = statements(main, "rewardbench",
                         lambda n: isinstance(n, ast.Expr) and "chosen > rejected" in ast.unparse(n))
    group = statements(main, "rewardbench", lambda n: _assigns(n, "results_grouped") or _assigns(n, "present_subsets")
                       or (isinstance(n, ast.For) and ast.unparse(n.iter) == "present_subsets"))
    assert len(compare) == 1 and len(group) == 3, "rewardbench.py changed shape"
    namespace.update(constants=constants, main=main, compare=compare, group=group)
    return namespace


def official_numbers(official: dict, lines: list[dict]) -> dict:
    """What RewardBench's code makes of our per-row scores: subsets, sections, Score, Legacy (percentages)."""
    import numpy as np
    import pandas as pd

    namespace = dict(official)
    namespace.update(results=[], score_chosen_batch=[line["chosen_score"] for line in lines],
                     score_rejected_batch=[line["rejected_score"] for line in lines])
    run_statements(official["main"], official["compare"], namespace)
    core = [(line["subset"], ok) for line, ok in zip(lines, namespace["results"]) if line["subset"] not in PRIOR_SETS]
    namespace["out_dataset"] = pd.DataFrame({"subsets": [s for s, _ in core], "results": [ok for _, ok in core]})
    run_statements(official["main"], official["group"], namespace)
    grouped = namespace["results_grouped"]
    sections = official["calculate_scores_per_section"](official["EXAMPLE_COUNTS"], official["SUBSET_MAPPING"],
                                                        grouped)
    # prior sets: RewardBench scores them in a separate run (the pref-sets results); same per-pair rule
    prior = {}
    for subset in PRIOR_SETS:
        oks = [ok for line, ok in zip(lines, namespace["results"]) if line["subset"] == subset]
        prior[subset] = sum(oks) / len(oks) if oks else np.nan
    df = pd.DataFrame([{"model": "ours", "model_type": "Seq. Classifier", **grouped}])
    df_prefs = pd.DataFrame([{"model": "ours", **prior}])
    legacy = official["get_average_over_rewardbench"](df, df_prefs)["average"].iloc[0]
    return {"subsets": {**grouped, **{k: v for k, v in prior.items() if not np.isnan(v)}},
            "sections": {k: 100 * v for k, v in sections.items()},
            "score": 100 * float(np.mean(list(sections.values()))), "legacy": 100 * float(legacy)}


# ---------------------------------------------------------------------------------------------------------------
# a fixture with every subset, prior sets, a tie between different responses and an identical pair
# ---------------------------------------------------------------------------------------------------------------
WORDS = ["good", "fine", "bad", "calm", "storm", "river", "light", "kind"]


def _fixture(tmp_path) -> Path:
    rows = []
    subsets = [s for members in SECTIONS.values() for s in members] + ["anthropic_helpful", "shp"]
    for n, subset in enumerate(subsets):
        for k in range(2 + n % 3):  # 2–4 rows a subset, so accuracies differ between subsets
            chosen = " ".join(WORDS[(n + k + j) % len(WORDS)] for j in range(1 + (n + k) % 4))
            rejected = " ".join(WORDS[(3 * n + k + j) % len(WORDS)] for j in range(1 + (n * k) % 3))
            rows.append({"prompt": f"question {n} {k} " + WORDS[n % len(WORDS)], "chosen": chosen,
                         "rejected": rejected, "subset": subset, "id": f"{subset}-{k}"})
    rows.append({"prompt": "same?", "chosen": "same answer", "rejected": "same answer",  # identical pair: a tie
                 "subset": "xstest-should-respond", "id": "identical"})
    rows.append({"prompt": "tie?", "chosen": "good calm", "rejected": "good storm",  # a tie for the rule scorer
                 "subset": "xstest-should-refuse", "id": "tie"})
    return write_jsonl(tmp_path / "rewardbench.jsonl", rows)


def _rule_scores(model, tokenizer, conversations, *args, **kwargs):
    return [float(conversation[-1]["content"].count("good")) for conversation in conversations]


def _run(tmp_path, model_dir, name):
    import eval_benchmark
    from rlhfkit.cli import parse_args

    record = tmp_path / name
    (args,) = parse_args((eval_benchmark.ScriptArguments,),
                         ["--reward_model_path", str(model_dir), "--dataset_path", str(_fixture(tmp_path)),
                          "--output_dir", str(record), "--calibration", "false", "--batch_size", "8"])
    eval_benchmark.main(args)
    results = json.loads((record / "results.json").read_text())
    lines = [json.loads(line) for line in (record / "scores.jsonl").read_text().splitlines()]
    return results, lines


def test_weights_and_sections_are_rewardbench_0_1_4s(official):
    assert EXAMPLE_COUNTS == official["EXAMPLE_COUNTS"]
    assert SECTIONS == official["SUBSET_MAPPING"]
    assert (EXAMPLE_COUNTS["xstest-should-refuse"], EXAMPLE_COUNTS["xstest-should-respond"]) == (154, 250)
    assert WEIGHTS_SOURCE["commit"] == "6552e93" and WEIGHTS_SOURCE["pypi"] == "rewardbench==0.1.4"


@pytest.mark.slow  # an eval_benchmark.py run on a tiny model (seconds)
@pytest.mark.parametrize("scorer", ["tiny_rm", "rule_with_ties"])
def test_eval_benchmark_numbers_equal_rewardbench_code(official, tmp_path, monkeypatch, tiny_rm_dir, scorer):
    if scorer == "rule_with_ties":  # scores = number of "good": many ties between different responses
        import rlhfkit.scoring

        monkeypatch.setattr(rlhfkit.scoring, "score_conversations", _rule_scores)
    results, lines = _run(tmp_path, tiny_rm_dir, scorer)
    ours = results["rewardbench"]
    expected = official_numbers(official, lines)

    ties = [line for line in lines if line["chosen_score"] == line["rejected_score"]]
    assert any(line["id"] == "identical" for line in ties)
    if scorer == "rule_with_ties":
        assert any(line["id"] == "tie" for line in ties) and len(ties) > 3
    assert {s: v["accuracy"] for s, v in results["per_subset"].items()} == pytest.approx(expected["subsets"], abs=1e-12)
    assert set(expected["subsets"]) == set(EXAMPLE_COUNTS) | {"anthropic_helpful", "shp"}  # every subset scored
    assert ours["sections"] == pytest.approx(expected["sections"], abs=1e-9)
    assert ours["score"] == pytest.approx(expected["score"], abs=1e-9)
    assert ours["legacy_score"] == pytest.approx(expected["legacy"], abs=1e-9)
    assert ours["weights"]["commit"] == "6552e93"
    # the fixture can tell the weight orders apart: the xstest accuracies differ, so 250/154 would move Safety
    accuracy = {s: v["accuracy"] for s, v in results["per_subset"].items()}
    assert accuracy["xstest-should-refuse"] != accuracy["xstest-should-respond"]
