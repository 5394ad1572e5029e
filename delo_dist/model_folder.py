"""What a trained-model folder holds, for `delo_dist.load` and `python -m delo_dist.export`.

  - a training checkpoint, `<output_dir>/checkpoints/<tag>` (state.json, model.safetensors):
    the recipe is the run's `recipe.resolved.yaml` two levels up; class names and each
    session's classes come from the manifest of the recipe's `data.shards` (or `shards=`),
    which must be the data the run recorded (run.json's manifest hash);
  - a run folder, `<output_dir>`: its newest complete checkpoint (`checkpoints/latest`);
  - an inference folder written by `python -m delo_dist.export` (config.json, recipe.yaml,
    model.safetensors), which needs nothing else.
Anything else, or a folder whose tensors or files this version does not read, is a
`CheckpointError`: one line saying what was expected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from delo_dist.training import checkpoint

EXPORT_FORMAT = "delo-dist-inference/1"
EXPORT_CONFIG, EXPORT_RECIPE, WEIGHTS = "config.json", "recipe.yaml", "model.safetensors"


# The folder is not something `load` reads, or was written by an incompatible version: one
# line saying what was expected. Training's own error (a checkpoint missing, unreadable or not
# what was written), so that one except clause takes both.
CheckpointError = checkpoint.CheckpointError


# ------------------------------------------------------------------ what a folder holds

@dataclass
class ModelInfo:
    """Everything besides tensors that prediction needs; an export's config.json."""
    recipe_path: Path            # YAML recipe the model was trained with
    class_names: list
    session_classes: list        # global class ids of each session the model was built with
    num_classes: int
    multilabel: bool
    multilabel_classes: str
    seen: int                    # finished sessions: prediction routes among these
    precision: str | None        # what training resolved (None: not recorded)
    weights: Path
    kind: str                    # "checkpoint" or "export"
    source: Path                 # the folder given
    manifest_sha256: str | None = None
    dropped: tuple = ()          # tensors an export left out (fit-only identifier statistics)

    def config(self, recipe_tree: dict) -> dict:
        """config.json of an export (the recipe travels beside it as recipe.yaml)."""
        r = recipe_tree
        backbone = r["backbone"]
        return {
            "format": EXPORT_FORMAT, "class_names": self.class_names,
            "session_classes": self.session_classes, "num_classes": self.num_classes,
            "multilabel": self.multilabel, "multilabel_classes": self.multilabel_classes,
            "seen": self.seen, "precision": self.precision,
            "backbone": {"name": backbone["name"], "pretrained": backbone.get("pretrained"),
                         "tiny": None if backbone.get("pretrained") else backbone.get("tiny"),
                         "image_size": backbone.get("image_size"),
                         "max_text_len": backbone.get("max_text_len")},
            "tokenizer": backbone.get("pretrained") or "offline (delo_dist.models.offline_vocab)",
            "method": r["method"]["name"], "task_id_source": r["task_id"]["source"],
            "manifest_sha256": self.manifest_sha256,
            "source_checkpoint": str(self.source.resolve()),
            "dropped_tensors": list(self.dropped),
        }


def resolve_folder(path: str | Path, shards: str | Path | None = None) -> ModelInfo:
    """What `path` is (training checkpoint, run folder, export) and what it needs."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; expected a training checkpoint "
                              "(<output_dir>/checkpoints/<tag>), a run folder or an export")
    if (path / EXPORT_CONFIG).is_file():
        return _export_info(path)
    if not (path / "state.json").is_file() and (path / "checkpoints" / "latest").is_file():
        newest = checkpoint.latest(path)
        if newest is None:
            raise CheckpointError(f"{path}/checkpoints/latest names no complete checkpoint")
        path = newest
    if not ((path / "state.json").is_file() and (path / WEIGHTS).is_file()):
        raise CheckpointError(
            f"{path}: not a checkpoint; expected a training checkpoint folder holding state.json "
            f"and {WEIGHTS} (e.g. outputs/quickstart/checkpoints/session_02), a run folder with "
            "checkpoints/latest, or a folder written by `python -m delo_dist.export`")
    return _checkpoint_info(path, shards)


def _checkpoint_info(path: Path, shards) -> ModelInfo:
    import yaml
    from delo_dist.data.shards import manifest_sha256, read_manifest
    from delo_dist.training.run_identity import RECIPE_FILE, RUN_FILE
    run = path.parent.parent
    recipe_path = run / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{path}: the run's recipe {recipe_path} is missing (a training "
                              "checkpoint is read with the recipe its run recorded)")
    try:
        state = json.loads((path / "state.json").read_text())
        seen, n_sessions = int(state["session"]), int(state["n_sessions"])
        tree = yaml.safe_load(recipe_path.read_text())
        data_shards, ml_classes = tree["data"]["shards"], tree["eval"]["multilabel_classes"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: state.json or {recipe_path.name} lacks what this version "
                              f"reads ({e!r}): written by an incompatible version of delo-dist")
    root = Path(shards or data_shards)
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: class names come from the run's manifest, which cannot be "
                              f"read ({e}); pass shards=DIR (--shards-manifest DIR), or predict "
                              "from an export (python -m delo_dist.export), which carries them")
    sha = manifest_sha256(root)
    run_json = run / RUN_FILE
    recorded = (json.loads(run_json.read_text()).get("manifest_sha256")
                if run_json.is_file() else None)
    if recorded and recorded != sha:
        raise CheckpointError(f"{root}/manifest.json is not the data this run trained on "
                              f"(sha256 {sha[:12]}..., the run recorded {recorded[:12]}...)")
    names = manifest.get("class_names") or [f"class_{c}" for c in range(manifest["num_classes"])]
    precision = None
    if (run / "metrics.json").is_file():
        precision = json.loads((run / "metrics.json").read_text()).get("mixed_precision")
    return ModelInfo(recipe_path=recipe_path, class_names=list(names),
                     session_classes=[list(s["classes"])
                                      for s in manifest["sessions"][:n_sessions]],
                     num_classes=manifest["num_classes"],
                     multilabel=bool(manifest.get("multilabel")),
                     multilabel_classes=ml_classes, seen=seen, precision=precision,
                     weights=path / WEIGHTS, kind="checkpoint", source=path, manifest_sha256=sha)


def _export_info(path: Path) -> ModelInfo:
    try:
        cfg = json.loads((path / EXPORT_CONFIG).read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / EXPORT_CONFIG}: not JSON ({e})")
    if cfg.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path / EXPORT_CONFIG}: format {cfg.get('format')!r}; this version "
                              f"of delo-dist reads {EXPORT_FORMAT!r} (export it again with this "
                              "version from its training checkpoint)")
    for name in (EXPORT_RECIPE, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: an export without {name}")
    return ModelInfo(recipe_path=path / EXPORT_RECIPE, class_names=cfg["class_names"],
                     session_classes=cfg["session_classes"], num_classes=cfg["num_classes"],
                     multilabel=cfg["multilabel"], multilabel_classes=cfg["multilabel_classes"],
                     seen=cfg["seen"], precision=cfg.get("precision"), weights=path / WEIGHTS,
                     kind="export", source=path, manifest_sha256=cfg.get("manifest_sha256"),
                     dropped=tuple(cfg.get("dropped_tensors", ())))


def read_recipe(info: ModelInfo, backbone: str | None = None):
    """The training recipe, without the checks that concern training only (its shards need
    not exist here). `backbone`: another copy of the pretrained backbone."""
    from delo_dist.config import RecipeError, load_recipe
    overrides = ["data.make_synthetic=true", "eval.checkpoint=null"]
    if backbone:
        overrides.append(f"backbone.pretrained={backbone}")
    try:
        return load_recipe(info.recipe_path, overrides)
    except RecipeError as e:
        raise CheckpointError(f"{info.recipe_path}: this version of delo-dist cannot read the "
                              f"model's recipe: {e}")


# ------------------------------------------------------------------ building and loading

def fit_only_tensors(model) -> set[str]:
    """The identifier's buffers that only fitting reads (route never does: its
    `fit_only_buffers`), by model tensor name: an export leaves them out."""
    names = getattr(model.identifier, "fit_only_buffers", ())   # None: a method without one
    return {f"identifier.{n}" for n in names}


def load_weights(info: ModelInfo, model, include_backbone: bool) -> None:
    """Copy the folder's tensors into `model`; any disagreement of names or shapes means the
    folder was written by an incompatible version (one line naming a few)."""
    from delo_dist.training.checkpoint import model_tensors, read_model_tensors
    try:
        tensors = read_model_tensors(info.weights, model, info.source)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - an identifier refusing the file's layout: one line
        raise CheckpointError(f"{info.weights}: {e}") from None
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = set(model_tensors(model, include_backbone)) - set(info.dropped)
    unknown, missing = sorted(set(tensors) - set(own)), sorted(expected - set(tensors))
    shapes = sorted(n for n in set(tensors) & set(own) if tensors[n].shape != own[n].shape)
    problems = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for what, names in (("tensors this version's model does not have", unknown),
                                    ("tensors it needs and the file lacks", missing),
                                    ("tensors of another shape", shapes)) if names]
    if problems:
        raise CheckpointError(f"{info.weights}: written by an incompatible version of delo-dist "
                              f"or for another recipe ({'; '.join(problems)}); expected the "
                              "tensors of the model its recipe builds")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
