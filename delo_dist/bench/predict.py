"""Prediction rows: `delo_dist.load(...)`'s predict path next to the evaluation path, one
model, one batch, timed alternately (adjacent rows of the round-robin):
  predict/<method>   InferenceModel.predict_batch(batch): the forward, plus what prediction
                     adds per batch (the identifier's scores and confidence, probabilities,
                     one result dict a sample)
  evaluate/<method>  ContinualModel.predict(batch, seen, oracle=False) under the training's
                     autocast: what the trainer's evaluation runs
The model is built at the bench's shape (not trained: no training changes the cost), its
identifier fitted on the batch, written as an export folder (delo_dist/export.py's layout)
and read back by `delo_dist.load(folder, batch_size=...)`; the batch is collated once by the
loaded model's backbone. The two rows must agree within noise (`prediction` in the result:
samples/s mean +/- std each and their paired difference) and predict the same classes.
"""
from __future__ import annotations

from pathlib import Path

from delo_dist.bench.harness import Row
from delo_dist.bench.rows import (LinearWork, Setup, build_model, fit_identifier, fresh,
                                  to_device)
from delo_dist.plugins import BenchEntry
from delo_dist.training.engines import autocast


def export_untrained(model, recipe, folder: Path, precision: str) -> None:
    """An export folder of a model built from `recipe` (every session counted as finished)."""
    import yaml

    from delo_dist.config import to_dict
    from delo_dist.export import write_export
    from delo_dist.model_folder import EXPORT_RECIPE, WEIGHTS, ModelInfo
    from delo_dist.training.checkpoint import model_tensors
    folder.mkdir(parents=True)
    info = ModelInfo(recipe_path=folder / EXPORT_RECIPE,
                     class_names=[f"class_{c}" for c in range(model.num_classes)],
                     session_classes=model.session_classes, num_classes=model.num_classes,
                     multilabel=model.multilabel, multilabel_classes="seen",
                     seen=model.n_sessions, precision=precision, weights=folder / WEIGHTS,
                     kind="export", source=folder)
    write_export(folder, model_tensors(model, include_backbone=not recipe.backbone.pretrained),
                 info, yaml.safe_dump(to_dict(recipe), sort_keys=False))


def prediction_rows(setup: Setup, name: str, entry: BenchEntry, batch_size: int,
                    folder: Path, precision: str, work: LinearWork) -> list[Row]:
    import delo_dist
    recipe = setup.recipe(entry.overrides, method=name)
    model = build_model(setup, recipe, setup.sessions)
    samples = setup.samples(batch_size)
    fit_identifier(model, to_device(model.backbone.collate(samples), setup.device),
                   setup.sessions, newest_only=False)
    export_untrained(model, recipe, folder, precision)
    del model
    m = delo_dist.load(folder, device=setup.device, precision=precision, batch_size=batch_size)
    batch = to_device(m.model.backbone.collate(samples), m.device)
    seen = {}

    def evaluate():
        with autocast(m.precision, m.device):
            return m.model.predict(fresh(batch), m.seen, oracle=False)

    def predicted(results: list) -> dict:
        seen["predict"] = [r["class_ids"] for r in results]
        return {}

    def evaluated(out: dict) -> dict:
        pred = out["pred"].cpu()
        ids = ([r.nonzero().squeeze(1).tolist() for r in pred] if m.multilabel
               else [[c] for c in pred.tolist()])
        return {"same_predictions": ids == seen.get("predict")}
    rows = [Row(f"predict/{name}", lambda: m.predict_batch(fresh(batch)), batch_size, autocast=False,
                inspect=predicted),
            Row(f"evaluate/{name}", evaluate, batch_size, autocast=False, inspect=evaluated)]
    for row in rows:
        row.probe = work.probe(m.model.backbone, row.info)
    return rows
