"""Continual-learning metrics as pure functions of the accuracy matrix.

a[k][i] = performance on session i after training session k (rows grow by one per session:
row k has k + 1 entries). With T finished sessions (paper, "Evaluation Metrics"):
    AP = mean_i a[T-1][i]
    FG = 1/(T-1) * sum_{t < T-1} max_{z in [t, T-2]} (a[z][t] - a[T-1][t])      (Eq. 11)
(the max form; the official code's diagonal form a[t][t] - a[T-1][t] is `forgetting_diag`).
BWT = 1/(T-1) * sum_{t < T-1} (a[T-1][t] - a[t][t]).
Performance is accuracy for single-label data and macro-F1 (sigmoid > 0.5) for multi-label,
over the classes `scored_classes` names (`eval.multilabel_classes`).
"""
from __future__ import annotations

import statistics

import torch
from torchmetrics.functional.classification import multilabel_f1_score


def average_performance(matrix: list[list[float]]) -> float:
    last = matrix[-1]
    return float(sum(last) / len(last))


def forgetting(matrix: list[list[float]]) -> float:
    T = len(matrix)
    if T < 2:
        return 0.0
    drops = [max(matrix[z][t] - matrix[T - 1][t] for z in range(t, T - 1)) for t in range(T - 1)]
    return float(sum(drops) / (T - 1))


def forgetting_diag(matrix: list[list[float]]) -> float:
    T = len(matrix)
    if T < 2:
        return 0.0
    return float(sum(matrix[t][t] - matrix[T - 1][t] for t in range(T - 1)) / (T - 1))


def backward_transfer(matrix: list[list[float]]) -> float:
    T = len(matrix)
    if T < 2:
        return 0.0
    return float(sum(matrix[T - 1][t] - matrix[t][t] for t in range(T - 1)) / (T - 1))


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if len(labels) else 0.0


def macro_f1(pred: torch.Tensor, target: torch.Tensor, classes: list[int]) -> float:
    """Macro-F1 over `classes` (columns of the (N, C) multi-hot tensors)."""
    cols = torch.tensor(classes)
    return float(multilabel_f1_score(pred[:, cols].long(), target[:, cols].long(),
                                     num_labels=len(classes), average="macro", threshold=0.5))


def scored_classes(session_classes: list[list[int]], session: int, seen: int, mode: str) -> list[int]:
    """The classes whose F1 is averaged on session `session`'s test set after `seen` sessions.

    "seen" (the reference's): every class of sessions 0..seen-1, as the DeLo code slices
    logits and labels to the classes seen so far; a seen class with no positive label and
    no positive prediction in that test set scores F1 = 0, as in torchmetrics and
    scikit-learn's default. "session": session `session`'s own classes only.
    Predictions are the model's (the routed session's head; every other class predicted 0).
    """
    if mode == "seen":
        return sorted(c for classes in session_classes[:seen] for c in classes)
    if mode == "session":
        return list(session_classes[session])
    raise ValueError(f"eval.multilabel_classes: {mode!r}, expected 'seen' or 'session'")


def metric_name(multilabel: bool, multilabel_classes: str) -> str:
    """What a performance cell is: 'accuracy', 'macro_f1/seen' or 'macro_f1/session'."""
    return f"macro_f1/{multilabel_classes}" if multilabel else "accuracy"


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(labels), num_classes, dtype=torch.bool)
    for i, ids in enumerate(labels):
        out[i, ids] = True
    return out


def mean_std(values) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the values that are not None; std None when n < 2, mean None
    when n = 0. The one rule for every spread this package reports."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)
