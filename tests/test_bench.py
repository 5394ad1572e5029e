"""The benchmark command (a smoke test: never a timing assertion) and the equality of DeLo's
factorised update with the materialised per-sample dW it is timed against."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from delo_dist import bench
from delo_dist.methods.delo import DeloSession, FactorPool

TINY_ARGS = ["--hidden", "32", "--layers", "2", "--heads", "2", "--batch", "4",
             "--text-len", "12", "--image-size", "32", "--patch", "16",
             "--experts", "4", "--rank", "2", "--sessions", "3",
             "--repeats", "2", "--warmup", "1", "--loader-samples", "16"]


def test_bench_command_writes_every_row_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(TINY_ARGS + ["--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows, ratios = result["rows"], result["ratios"]
    expected_rows = {"train/head_only", "train/lora", "train/peft_lora", "train/delo",
                     "train/delo_full", "train/delo_naive", "train/delo_fr2"}
    expected_rows |= {f"infer/{m}/oracle" for m in
                      ("head_only", "lora", "peft_lora", "delo", "delo_naive", "delo_fr2")}
    expected_rows |= {f"infer/{m}/agnostic" for m in
                      ("head_only", "lora", "delo", "delo_fr2", "delo_pooled", "delo_T1", "delo_T10")}
    expected_rows |= {"train/delo_T1", "train/delo_T10", "infer/vilt/sdpa", "infer/vilt/eager"}
    assert set(rows) == expected_rows
    for name, row in rows.items():
        assert row["repeats"] == 2, name
        for key in ("median_ms", "min_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
    assert set(ratios) == {"median", "min"}
    assert set(ratios["median"]) == set(ratios["min"]) == set(bench.TARGETS) | {
        "train: delo / lora (ours)", "train: lora (ours) / peft lora",
        "train: delo / delo naive", "infer oracle: delo / delo naive",
        "train: delo factor_rank 2 / 1", "infer oracle: delo factor_rank 2 / 1",
        "train: delo full objective / lora (ours)"}
    assert all(math.isfinite(v) and v > 0 for r in ratios.values() for v in r.values())
    meta = result["meta"]
    assert meta["complete_fraction"] == 0.5 and meta["versions"]["torch"] == torch.__version__
    assert result["targets"]["train_full_over_ce"] == ["<=", 1.5] or \
        result["targets"]["train_full_over_ce"] == ("<=", 1.5)
    assert result["loader"]["samples"] == 16
    for name in ("infer/delo_T1/agnostic", "infer/delo_T10/agnostic"):   # one session routed
        assert rows[name]["routed_sessions"] == 1 and rows[name]["routing_accuracy"] == 1.0
    assert meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["torch"] == torch.__version__
    assert meta["shapes"]["hidden"] == 32 and meta["tokens"] == 12 + 4 + 1
    assert "train/delo_naive" in capsys.readouterr().out  # the table follows the JSON


def test_bench_peft_copy_trains_only_lora_and_head():
    args = bench.parse_args(TINY_ARGS)
    ref = bench.peft_copy(bench.build(args, "head_only"), args)
    names = set(ref.set_trainable(1))
    assert names and all("lora_" in n or n.startswith("heads.1.") for n in names)
    assert sum("lora_" in n for n in names) == 2 * 3 * args.layers  # A and B on q, k, v


@pytest.mark.parametrize("factor_rank", [1, 3])
def test_factor_pool_fast_path_equals_naive(factor_rank):
    torch.manual_seed(factor_rank)
    pool = FactorPool(d_in=24, d_out=20, experts=6, rank=3, factor_rank=factor_rank).double()
    with torch.no_grad():
        pool.B.normal_()  # B starts at zero: make the update non-trivial
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    q = torch.randn(5, 24, dtype=torch.float64)
    fast, naive = pool.delta(x, q), pool.delta_naive(x, q)
    assert fast.abs().max() > 0
    assert torch.allclose(fast, naive, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("factor_rank", [1, 4])
@pytest.mark.parametrize("modality_pools", [True, False])
def test_delo_session_fast_path_equals_naive_with_gradients(factor_rank, modality_pools):
    cfg = SimpleNamespace(alpha=2.0, modality_pools=modality_pools, experts=8, rank=4,
                          factor_rank=factor_rank, a_init_std=None)
    torch.manual_seed(0)
    session = DeloSession(32, 16, cfg)
    with torch.no_grad():
        for p in session.parameters():
            p.normal_()
    x = torch.randn(3, 9, 32)
    q_v, q_t, q_all = torch.randn(3, 32), torch.randn(3, 32), torch.randn(3, 32)
    fast = session.delta(x, q_v, q_t, q_all)
    grads_fast = torch.autograd.grad(fast.square().sum(), list(session.parameters()))
    naive = session.delta(x, q_v, q_t, q_all, naive=True)
    grads_naive = torch.autograd.grad(naive.square().sum(), list(session.parameters()))
    assert torch.allclose(fast, naive, atol=1e-4, rtol=1e-4)
    for gf, gn in zip(grads_fast, grads_naive):
        assert torch.allclose(gf, gn, atol=1e-3, rtol=1e-3)
