"""The package's layout rule, checked on the source (no imports run): the core (`rlhfkit/*.py`) imports no stage
family; a family (`rlhfkit/<family>/`) imports the core and itself, never another family. Scripts and tests may
import anything. A newcomer finds a change's place from the stage they run; this keeps that true."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhfkit"
FAMILIES = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def _imported_rlhfkit_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every `rlhfkit.…` module a file imports (absolute or relative), with its line number."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ('rlhfkit',) or ('rlhfkit', fam)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "rlhfkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] != "rlhfkit":
                continue
            if module == "rlhfkit":  # `from rlhfkit import x`: x may itself be a module
                found += [(node.lineno, f"rlhfkit.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FAMILIES else None


def test_there_are_families():
    assert {"train", "rl", "eval", "mixtures"} <= set(FAMILIES)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layout(path):
    own = path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else None
    bad = []
    for line, module in _imported_rlhfkit_modules(path):
        family = _family_of(module)
        if family is not None and family != own:
            where = "the core" if own is None else f"family '{own}'"
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {where} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_cross_family_import():
    # The check itself can fail: imports of another family, absolute or relative, are seen as such.
    probe = PACKAGE / "eval" / "probe.py"
    source = "from rlhfkit.train.losses import bradley_terry_loss\nfrom ..rl import estimators\nfrom . import bootstrap\n"
    found = [module for _, module in _imported_rlhfkit_modules(probe, source)]
    assert found == ["rlhfkit.train.losses", "rlhfkit.rl", "rlhfkit.eval"]
    assert [_family_of(m) for m in found] == ["train", "rl", "eval"]
