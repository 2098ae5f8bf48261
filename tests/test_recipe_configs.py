"""Every shipped stage YAML in configs/recipes/ parses with its stage's own arguments (unknown keys are fatal), and
every chain is complete: a checkpoint a recipe reads from `runs/…` is the output_dir of another shipped recipe."""

import importlib
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import parse_args

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"
STAGE_OF = {"sft": "sft_train", "rm": "rm_train", "dpo": "dpo_train", "ppo": "ppo_train"}
CHECKPOINT_KEYS = ("model_name_or_path", "reward_model_path", "ref_model_path")
ALL = sorted(RECIPES.glob("*/*.yaml"))


def test_every_recipe_folder_is_a_stage():
    assert {p.parent.name for p in ALL} == set(STAGE_OF)


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_with_its_stage(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output dirs are relative: nothing is created here, nothing leaks into the repo
    stage = importlib.import_module(STAGE_OF[recipe.parent.name])
    parsed = parse_args(stage.ARGUMENTS, ["--config", str(recipe)])
    assert len(parsed) == len(stage.ARGUMENTS)


def test_chains_are_complete():
    configs = {p: yaml.safe_load(p.read_text()) for p in ALL}
    outputs = {c["output_dir"] for c in configs.values()}
    missing = [f"{p.parent.name}/{p.name}: {key} {c[key]}" for p, c in configs.items() for key in CHECKPOINT_KEYS
               if isinstance(c.get(key), str) and c[key].startswith("runs/") and c[key] not in outputs]
    assert not missing, "recipes read checkpoints no shipped recipe writes:\n" + "\n".join(missing)
