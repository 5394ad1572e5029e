"""Recipe loading: every error names the file, the key and what was expected."""
from __future__ import annotations

import pytest

from delo_dist.config import RecipeError, load_recipe
from tests.conftest import REPO


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as e:
        load_recipe(path, list(overrides))
    return str(e.value)


def test_unknown_key_names_file_and_dotted_key(tmp_path, shards):
    p = write(tmp_path, f"data:\n  shards: {shards}\n  etaa: 0.3\n")
    msg = error_of(p)
    assert str(p) in msg and "'data.etaa'" in msg and "'eta'" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path, shards):
    msg = error_of(write(tmp_path, f"data:\n  shards: {shards}\ntrain:\n  epochs: three\n"))
    assert "'train.epochs'" in msg and "int" in msg and "'three'" in msg


@pytest.mark.parametrize("override, key", [
    ("data.eta=1.5", "data.eta"), ("data.eta=-0.1", "data.eta"),
    ("method.delo.rank=17", "method.delo.rank"), ("data.both_ratio=2", "data.both_ratio"),
    ("data.missing_type=audio", "data.missing_type"), ("train.lr=0", "train.lr"),
])
def test_impossible_values_are_refused(tmp_path, shards, override, key):
    msg = error_of(write(tmp_path, f"data:\n  shards: {shards}\n"), [override])
    assert f"'{key}'" in msg and "expected" in msg


def test_r_greater_than_e_message(tmp_path, shards):
    msg = error_of(write(tmp_path, f"data:\n  shards: {shards}\nmethod:\n  delo:\n    experts: 4\n"
                                   "    rank: 5\n"))
    assert "'method.delo.rank'" in msg and "r <= E" in msg and "experts=4" in msg


def test_missing_shards_path(tmp_path):
    msg = error_of(write(tmp_path, f"data:\n  shards: {tmp_path / 'nowhere'}\n"))
    assert "'data.shards'" in msg and "manifest.json" in msg


def test_missing_recipe_file_and_bad_override(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "none.yaml")
    msg = error_of(write(tmp_path, "seed: 1\n"), ["data.eta"])
    assert "key.sub=value" in msg


def test_overrides_apply_and_dict_keys_merge(tmp_path, shards):
    r = load_recipe(write(tmp_path, f"data:\n  shards: {shards}\n"),
                    ["data.eta=0.3", "backbone.tiny.hidden_size=32", "method.name=lora"])
    assert r.data.eta == 0.3 and r.method.name == "lora"
    assert r.backbone.tiny["hidden_size"] == 32 and r.backbone.tiny["num_hidden_layers"] == 2
    assert isinstance(load_recipe(None, [f"data.shards={shards}", "train.lr=1"]).train.lr, float)


def test_task_id_keys_of_earlier_versions_move_under_their_source(tmp_path, shards, capsys):
    r = load_recipe(write(tmp_path, f"data:\n  shards: {shards}\ntask_id:\n  layers: last\n"
                                    "  max_dims: 64\n  reduce: sketch\n  projection_seed: 3\n"
                                    "  targets: class\n"), [])
    s = r.task_id.settings
    assert (s.layers, s.max_dims, s.reduce, s.projection_seed, s.targets) == (
        "last", 64, "sketch", 3, "class")
    assert "now live under 'task_id.analytic'" in capsys.readouterr().err
    r = load_recipe(write(tmp_path, f"data:\n  shards: {shards}\n"),
                    ["task_id.source=paper", "task_id.layers=last", "task_id.momentum=0.5"])
    assert r.task_id.settings.momentum == 0.5   # layers: not paper's, ignored with a note


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe, shards):
    r = load_recipe(REPO / "recipes" / recipe, [f"data.shards={shards}"])
    assert r.method.settings is not None and r.backbone.settings is not None
