"""The benchmarks' own scoring code as test oracles, read from a local checkout that is never part of this repository.

Set `RLHFKIT_OFFICIAL_SOURCES` to a directory holding checkouts (or just the files used) of:
  RM-Bench/                     THU-KEG/RM-Bench @ 73c52d7b27b361621361ec959ac6c0eb9bb7a689 (scripts/utils.py)
  RMB-Reward-Model-Benchmark/   Zhou-Zoey/RMB-Reward-Model-Benchmark @ 2be3180857f2190b7ffa929d43190835627f1f4d
                                (eval/scripts/my_run_rm.py)
  RM-R1/                        RM-R1-UIUC/RM-R1 @ 11f9f63d89cd773f395ee8d81cf5daa8e0d29bab
                                (eval/RMB-Reward-Model-Benchmark/eval/scripts/run_rm_bestofn.py, process_final_result.py)
  JudgeBench/                   ScalerLab/JudgeBench @ e2c52c284e735e139b3daa61c206ee208f36c461
                                (utils/metrics.py, utils/judges.py)
Without it the oracle tests skip; the hand computations beside them (which follow the same code line by line) always
run. The official scripts import GPU and hub libraries at the top, so the pure pieces are taken out of the source
with `ast` (whole functions, or the exact statements of a `main()`) and run here on our scores.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest


def official_file(repo: str, path: str) -> Path:
    root = os.environ.get("RLHFKIT_OFFICIAL_SOURCES")
    if not root:
        pytest.skip("RLHFKIT_OFFICIAL_SOURCES is not set (official benchmark code for the oracle)")
    file = Path(root) / repo / path
    if not file.is_file():
        pytest.skip(f"{file} not found")
    return file


def load_definitions(file: Path, names: list[str], namespace: dict) -> dict:
    """Execute the named top-level function and class definitions of `file` in `namespace`, in source order (the
    file's imports are not run: `namespace` provides what the definitions use)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    found = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    missing = set(names) - {node.name for node in found}
    assert not missing, f"{file} no longer defines {missing}"
    exec(compile(ast.Module(body=found, type_ignores=[]), str(file), "exec"), namespace)
    return namespace


def statements(file: Path, match, function: str | None = None) -> list[ast.stmt]:
    """Statements of `file` (inside `function` when given), in source order, for which `match(node)` is true."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    scope: ast.AST = tree
    if function is not None:
        scope = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    found = [node for node in ast.walk(scope) if isinstance(node, ast.stmt) and match(node)]
    return sorted(found, key=lambda node: node.lineno)


def run_statements(file: Path, nodes: list[ast.stmt], namespace: dict) -> dict:
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(file), "exec"), namespace)
    return namespace


def assigns_to(node: ast.stmt, name: str) -> bool:
    """`name = …` (a plain name, or a tuple of names containing it)."""
    if not isinstance(node, ast.Assign):
        return False
    for target in node.targets:
        names = [target] if isinstance(target, ast.Name) else getattr(target, "elts", [])
        if any(isinstance(item, ast.Name) and item.id == name for item in names):
            return True
    return False


def source(node: ast.AST) -> str:
    return ast.unparse(node)
