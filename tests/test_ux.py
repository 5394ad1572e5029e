"""What a user sees: override errors name the command line, logs hold plain progress lines,
the README points at nothing outside the repository."""
from __future__ import annotations

import re

import pytest

from delo_dist.config import RecipeError, load_recipe
from delo_dist.training.trainer import Trainer
from tests.conftest import REPO


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"), ("train.lr=1e38", "train.lr"), ("train.epochs=three", "train.epochs"),
    ("data.etaa=0.3", "data.etaa"), ("method.delo.rank=99", "method.delo.rank"),
    ("method.rank=99", "method.delo.rank"),   # a key of an earlier version, moved: still blamed
    ("task_id.max_dims=8", "task_id.analytic.max_dims"),   # likewise (task_id.analytic.*)
])
def test_override_errors_name_the_command_line(shards, override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.shards={shards}", override])
    assert str(e.value).startswith(f"command line: override '{override}'") and f"'{key}'" in str(e.value)


def test_recipe_file_errors_still_name_the_file(tmp_path, shards):
    p = tmp_path / "r.yaml"
    p.write_text(f"data:\n  shards: {shards}\ntrain:\n  lr: 0\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["train.epochs=2"])
    assert str(e.value).startswith(f"{p}: key 'train.lr'")


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_log_gets_plain_progress_lines(recipe_for, capfd):
    assert Trainer(recipe_for(**{"data.sessions": 1})).run() == 0
    out, err = capfd.readouterr()
    assert "session 0 epoch 1/1 step 2/8 loss" in out and "\r" not in out + err


def test_readme_names_nothing_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "../" not in readme and "/work/" not in readme
    assert "DeLo: Dual Decomposed Low-Rank Experts Collaboration" in readme
    for line in re.findall(r"accelerate launch [^\n`]*", readme):
        if "recipes/" in line:
            assert "--config_file accelerate_configs/" in line, line
