"""Continual-learning metrics as pure functions of the accuracy matrix.

a[k][i] = performance on session i after training session k (rows grow by one per session:
row k has k + 1 entries). With T finished sessions (paper, "Evaluation Metrics"):
    AP = mean_i a[T-1][i]
    FG = 1/(T-1) * sum_{t < T-1} max_{z in [t, T-2]} (a[z][t] - a[T-1][t])      (Eq. 11)
(the max form; the official code's diagonal form a[t][t] - a[T-1][t] is `forgetting_diag`).
BWT = 1/(T-1) * sum_{t < T-1} (a[T-1][t] - a[t][t]).
Performance is accuracy for single-label data and macro-F1 (sigmoid > 0.5) for multi-label.
"""
from __future__ import annotations

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


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(labels), num_classes, dtype=torch.bool)
    for i, ids in enumerate(labels):
        out[i, ids] = True
    return out
