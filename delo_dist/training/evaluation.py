"""Evaluation on the test split of every session seen so far: task-agnostic performance (the
headline), oracle performance (true session id, for analysis), routing accuracy, and routing
accuracy by availability (complete, text-only, image-only).

Functions of what they need (a model, a loader per session, the scoring rule, precision and
device), returning values: the trainer calls them after each session and for
`eval.checkpoint`; `python -m delo_dist.predict --shards` scores its predictions with the same
`score`, so the two cannot disagree on what a number means.

A row per test sample: (key, label, pred, oracle pred, routed session, availability); labels
and predictions are class ids (a list of them when multi-label). Rows are gathered from every
rank and sorted by key, so the metric does not depend on the world size. `routed` is None for
methods where nothing routes (a shared head without per-session parts to choose): routing
accuracy is then None (empty in metrics.json, not logged).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from delo_dist import dist
from delo_dist import metrics as M
from delo_dist.models.task_id import AVAILABILITY, availability
from delo_dist.training.engines import autocast


@dataclass(frozen=True)
class Scoring:
    """How a session's test rows become one number: accuracy, or macro-F1 over the classes
    `eval.multilabel_classes` names (see metrics.scored_classes)."""
    multilabel: bool
    num_classes: int
    session_classes: tuple     # global class ids of each session
    multilabel_classes: str = "seen"

    @classmethod
    def of(cls, manifest: dict, multilabel_classes: str) -> "Scoring":
        return cls(bool(manifest.get("multilabel")), manifest["num_classes"],
                   tuple(tuple(s["classes"]) for s in manifest["sessions"]), multilabel_classes)


class EvalRow(NamedTuple):
    """One row of the matrices: a value per seen session."""
    performance: list
    oracle: list
    routing: list
    routing_by_availability: dict
    samples: list | None = None   # per session, its sorted sample rows (when asked)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, test_loader: Callable[[int], Iterable[dict]], seen: int, scoring: Scoring, *,
             device, precision: str, oracle: bool = True, progress: bool = False,
             keep_samples: bool = False) -> EvalRow:
    """Task-agnostic, oracle and routing accuracy on the test split of sessions < seen
    (`test_loader(i)` yields this rank's collated batches of session i), and routing accuracy
    by availability. `keep_samples`: also return every sample's row (sorted by key)."""
    model.eval()
    row, oracle_row, routing_row, routed_rows, samples = [], [], [], [], []
    for i in range(seen):
        local = []
        for batch in tqdm(test_loader(i), desc=f"eval S{i} of {seen}", leave=False,
                          disable=not progress):
            batch = to_device(batch, device)
            with autocast(precision, device):
                out = model.predict(batch, seen, oracle)
            # to the host once per batch: indexing device tensors per sample syncs each time
            labels, pred, oracle_pred, routed, avail = (_host(t) for t in (
                batch["labels"], out["pred"], out.get("oracle_pred"), out.get("routed"),
                availability(batch)))
            local += [(key, _plain(labels, j), _plain(pred, j), _plain(oracle_pred, j),
                       None if routed is None else int(routed[j]), int(avail[j]))
                      for j, key in enumerate(batch["keys"])]
        gathered = sorted((x for part in dist.all_gather_objects(local) for x in part))
        perf, oracle_perf, routing = score(gathered, i, seen, scoring)
        row.append(perf)
        oracle_row.append(oracle_perf)
        routing_row.append(routing)
        routed_rows.append([(r[4], r[5]) for r in gathered])
        if keep_samples:
            samples.append(gathered)
    return EvalRow(row, oracle_row, routing_row, routing_by_availability(routed_rows),
                   samples if keep_samples else None)


def score(rows: list, session: int, seen: int, scoring: Scoring) -> tuple[float, float, float | None]:
    """rows (key, label, pred, oracle pred, routed, ...) of session `session`'s test split after
    `seen` sessions -> (performance, oracle performance, routing accuracy: None where nothing
    routes)."""
    if scoring.multilabel:
        classes = M.scored_classes([list(c) for c in scoring.session_classes], session, seen,
                                   scoring.multilabel_classes)
        as_tensor = lambda col: M.multi_hot(col, scoring.num_classes)   # noqa: E731
        metric = lambda pred, y: M.macro_f1(pred, y, classes)         # noqa: E731
    else:
        as_tensor, metric = torch.tensor, M.accuracy
    column = lambda j: as_tensor([r[j] for r in rows])                # noqa: E731
    labels = column(1)
    oracle = metric(column(3), labels) if rows and rows[0][3] is not None else float("nan")
    routed = rows and rows[0][4] is not None
    routing = float(np.mean([r[4] == session for r in rows])) if routed else None
    return metric(column(2), labels), oracle, routing


def evaluate_checkpoint(path: Path, model, test_loader, scoring: Scoring, *, device,
                        precision: str, oracle: bool, progress: bool,
                        out_dir: Path | None) -> dict:
    """Evaluate a checkpoint on every session it has seen (no training). `out_dir` (the main
    rank's): write eval.json there and print the row. Returns what eval.json holds."""
    from delo_dist.training import checkpoint
    checkpoint.load_model(path, model)
    seen = json.loads((path / "state.json").read_text())["session"]
    res = evaluate(model, test_loader, seen, scoring, device=device, precision=precision,
                   oracle=oracle, progress=progress)
    out = {"checkpoint": str(path), "seen": seen, "performance": res.performance,
           "oracle_performance": res.oracle, "routing_accuracy": res.routing,
           "routing_by_availability": res.routing_by_availability, "world_size": dist.world()}
    if out_dir is not None:
        (Path(out_dir) / "eval.json").write_text(json.dumps(out, indent=1))
        print(f"evaluated {path} on {seen} sessions: " +
              " ".join(f"{100 * p:.2f}" for p in res.performance), flush=True)
    return out


def routing_by_availability(routed_rows: list[list[tuple[int | None, int]]]) -> dict:
    """routed_rows[i]: (routed session, availability) of each test sample of session i ->
    routing accuracy by availability (complete, text_only, image_only; None: no sample, or
    nothing routes), per session and over all samples, with the counts."""
    per_session, hits, totals = [], np.zeros(3), np.zeros(3)
    for i, rows in enumerate(routed_rows):
        h, n = np.zeros(3), np.zeros(3)
        for routed, a in rows:
            if routed is None:
                continue
            n[a] += 1
            h[a] += routed == i
        per_session.append({name: (h[a] / n[a] if n[a] else None) for a, name in enumerate(AVAILABILITY)})
        hits, totals = hits + h, totals + n
    overall = {name: (hits[a] / totals[a] if totals[a] else None) for a, name in enumerate(AVAILABILITY)}
    return {"overall": overall, "per_session": per_session,
            "count": {name: int(totals[a]) for a, name in enumerate(AVAILABILITY)}}


def _availability_scalars(b: dict) -> dict:
    out = {f"routing_acc_{n}": v for n, v in b["overall"].items() if v is not None}
    for i, row in enumerate(b["per_session"]):
        out.update({f"routing_acc_s{i}_{n}": v for n, v in row.items() if v is not None})
    return out


def _availability_line(b: dict) -> str:
    return ", ".join(f"{n.replace('_', '-')} {'-' if v is None else f'{100 * v:.1f}'}"
                     for n, v in b["overall"].items())


def _host(t):
    """A batch tensor on the CPU (lists and None as they are)."""
    return t.cpu() if torch.is_tensor(t) else t


def _plain(t, j):
    """Sample j of a batch tensor (or list) as JSON-able ids: an int, or a list of class ids
    for a multi-hot row; None stays None."""
    if t is None:
        return None
    v = t[j]
    if torch.is_tensor(v):
        return v.nonzero().squeeze(1).tolist() if v.dtype == torch.bool else int(v)
    return v

