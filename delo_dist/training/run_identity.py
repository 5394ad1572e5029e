"""Run identity: the output folder records the resolved recipe (`recipe.resolved.yaml`) and
`run.json` (the recipe's hash, the hash of its result-shaping keys, the data's manifest hash)
when a job starts. A relaunch on that folder continues it only if every result-shaping key
and the data are equal; keys that cannot change results (config.RESULT_NEUTRAL_KEYS) may
differ and are listed. So old results never carry new settings, and one MLflow run never
mixes two experiments.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from delo_dist.config import flatten, recipe_diff, result_neutral
from delo_dist.data.files import atomic_write_text

RECIPE_FILE = "recipe.resolved.yaml"
RUN_FILE = "run.json"


class RunIdentityError(RuntimeError):
    """The output folder holds a run of another recipe or other data."""


def recipe_sha256(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def result_sha256(tree: dict) -> str:
    """Hash of the result-shaping keys only: equal for runs that must give equal results."""
    shaping = {k: v for k, v in flatten(tree).items() if not result_neutral(k)}
    return recipe_sha256(shaping)


def differences(out: Path, tree: dict) -> tuple[list[str], list[str]]:
    """('key: old -> new' lines of the result-shaping keys, of the neutral keys) between the
    recipe recorded in `out` and `tree`; both empty when `out` records none."""
    path = Path(out) / RECIPE_FILE
    if not path.is_file():
        return [], []
    diff = recipe_diff(yaml.safe_load(path.read_text()) or {}, tree)
    lines = {k: f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()}
    return ([lines[k] for k in diff if not result_neutral(k)],
            [lines[k] for k in diff if result_neutral(k)])


def check_recipe(out: Path, tree: dict) -> list[str]:
    """Raise if `out` holds a run of a recipe differing in a result-shaping key; return the
    neutral keys that differ (allowed), as 'key: old -> new' lines."""
    path = Path(out) / RECIPE_FILE
    shaping, neutral = differences(out, tree)
    if shaping:
        raise RunIdentityError(
            f"{out} holds a run of another recipe ({path}); keys that shape results differ:\n  "
            + "\n  ".join(shaping)
            + ("\n(neutral keys differing, allowed: " + "; ".join(neutral) + ")" if neutral else "")
            + "\nUse another output_dir for the new recipe, or relaunch with the recorded one.")
    return neutral


def check_data(out: Path, manifest_sha: str) -> None:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("manifest_sha256")
    if old and old != manifest_sha:
        raise RunIdentityError(f"{out} holds a run on other data: manifest sha256 {old[:16]}... "
                               f"recorded, the shards now give {manifest_sha[:16]}... "
                               "(use another output_dir, or the data the run started with)")


def record(out: Path, tree: dict, manifest_sha: str) -> dict:
    """Write recipe.resolved.yaml and run.json (atomically); return run.json's content."""
    info = {"recipe_sha256": recipe_sha256(tree), "result_sha256": result_sha256(tree),
            "manifest_sha256": manifest_sha}
    for name, text in ((RECIPE_FILE, yaml.safe_dump(tree, sort_keys=False)),
                       (RUN_FILE, json.dumps(info, indent=1))):
        atomic_write_text(Path(out) / name, text)
    return info
