"""Missing-modality tables and continual-learning metrics: pure functions, exact numbers."""
from __future__ import annotations

import pytest
import torch

from delo_dist import metrics as M
from delo_dist.data.missing import (COMPLETE, IMAGE_MISSING, TEXT_MISSING, MissingSpec,
                                    missing_table, table_summary)

KEYS = [f"s00-train-{i:07d}" for i in range(100)]


def counts(table):
    v = list(table.values())
    return v.count(COMPLETE), v.count(TEXT_MISSING), v.count(IMAGE_MISSING)


def test_table_is_deterministic_and_independent_of_key_order():
    spec = MissingSpec(0.7, "both", 0.5, seed=3)
    a = missing_table(KEYS, spec, 0, "train")
    assert a == missing_table(list(reversed(KEYS)), spec, 0, "train")
    assert table_summary(a)["hash"] == table_summary(missing_table(KEYS, spec, 0, "train"))["hash"]
    for other in (MissingSpec(0.7, "both", 0.5, seed=4), MissingSpec(0.7, "both", 0.3, seed=3)):
        assert missing_table(KEYS, other, 0, "train") != a
    assert missing_table(KEYS, spec, 1, "train") != a      # keyed by session
    assert missing_table(KEYS, spec, 0, "test") != a       # and by split


@pytest.mark.parametrize("eta, kind, both_ratio, expected", [
    (0.7, "text", 0.5, (30, 70, 0)), (0.7, "image", 0.5, (30, 0, 70)),
    (0.7, "both", 0.5, (30, 35, 35)), (0.29, "both", 0.5, (71, 15, 14)),  # int(0.29*100) = 29
    (0.9, "both", 0.3, (10, 63, 27)), (0.0, "both", 0.5, (100, 0, 0)),
    (1.0, "text", 0.5, (0, 100, 0)), (0.7, "none", 0.5, (100, 0, 0)),
])
def test_exact_counts(eta, kind, both_ratio, expected):
    table = missing_table(KEYS, MissingSpec(eta, kind, both_ratio), 0, "train")
    assert counts(table) == expected
    s = table_summary(table)
    assert s["complete"] == pytest.approx(expected[0] / 100)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="missing_type"):
        missing_table(KEYS, MissingSpec(0.5, "audio"), 0, "train")
    with pytest.raises(ValueError, match="eta"):
        missing_table(KEYS, MissingSpec(1.5, "both"), 0, "train")


# a[k][i]: performance on session i after training session k
MATRIX = [[0.90],
          [0.70, 0.80],
          [0.80, 0.60, 0.85]]


def test_ap_is_mean_of_last_row():
    assert M.average_performance(MATRIX) == pytest.approx((0.80 + 0.60 + 0.85) / 3)


def test_fg_uses_the_max_over_earlier_checkpoints():
    # session 0: max(0.90, 0.70) - 0.80 = 0.10 ; session 1: 0.80 - 0.60 = 0.20
    assert M.forgetting(MATRIX) == pytest.approx(0.15)
    # the diagonal form differs where a session recovered and dipped: (0.90-0.80 + 0.80-0.60)/2
    assert M.forgetting_diag(MATRIX) == pytest.approx(0.15)
    dip = [[0.5], [0.9, 0.8], [0.7, 0.8, 0.9]]  # session 0 peaked after session 1
    assert M.forgetting(dip) == pytest.approx(((0.9 - 0.7) + 0.0) / 2)
    assert M.forgetting_diag(dip) == pytest.approx(((0.5 - 0.7) + 0.0) / 2)
    assert M.backward_transfer(dip) == pytest.approx(((0.7 - 0.5) + 0.0) / 2)
    assert M.forgetting([[0.4]]) == 0.0


def test_macro_f1_over_a_session_classes():
    target = M.multi_hot([[0], [1], [0, 1], [2]], 4)
    pred = M.multi_hot([[0], [0], [0, 1], [2]], 4)
    # class 0: tp 2 fp 1 fn 0 -> 0.8 ; class 1: tp 1 fn 1 -> 2/3
    assert M.macro_f1(pred, target, [0, 1]) == pytest.approx((0.8 + 2 / 3) / 2)
    assert M.accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
