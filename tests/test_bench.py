"""The benchmark command (a smoke test of its figures' shape and of what they count: never a
timing assertion), its harness's arithmetic, the loader set-up it shares with
`delo_dist.data.throughput`, and the equality of DeLo's factorised update with the
materialised per-sample dW it is timed against."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from delo_dist import bench, plugins
from delo_dist.bench import cli
from delo_dist.bench.harness import meets, paired_rates, ratios, target_value
from delo_dist.methods.delo import DeloSession, FactorPool
from delo_dist.models.method import Method

TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--batch", "4", "--text-len", "12",
        "--image-size", "32", "--patch", "16", "--sessions", "3", "--repeats", "2",
        "--warmup", "1", "--set", "method.delo.experts=4", "--set", "method.delo.rank=2",
        "--set", "method.lora.rank=2"]
ISSUE13 = {"train_delo_over_peft_lora", "train_full_over_ce", "infer_agnostic_over_oracle",
           "infer_agnostic_pooled_over_oracle", "train_T10_over_T1", "infer_T10_over_T1",
           "vilt_sdpa_over_eager", "loader_over_reference"}


class SharedHeadProbe(Method):
    """A method registered from a test, as a third-party plug-in would be, with one shared
    head over every seen class and, at inference, a frozen query pass before its own (the
    prompt methods' head mode and selection pass), and nothing else."""
    name = "bench_shared_probe"
    head = "shared"

    def predict(self, model, batch, seen, oracle=True):
        model.backbone.frozen_query(batch)   # cached per batch: each timed call must pay it
        model.set_batch(batch)
        pooled = model.run_backbone(batch)
        return {"pred": model.predict_shared(pooled, seen), "routed": None}


@pytest.fixture
def probe_registered(monkeypatch):
    monkeypatch.setitem(plugins._registered["method"], SharedHeadProbe.name, SharedHeadProbe)


def test_bench_vilt_rows_ratios_targets_and_prediction(tmp_path, capsys, probe_registered):
    out = tmp_path / "bench.json"
    result = bench.main(TINY + ["--methods", "head_only,delo,lora,bench_shared_probe",
                                "--loader-samples", "16", "--warmup", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    expected = {"frozen/vilt", "frozen/vilt_eager", "loader/vilt", "loader/vilt_reference",
                "predict/delo", "evaluate/delo"}
    expected |= {f"{k}/{m}" for m in ("head_only", "delo", "lora") for k in ("train", "oracle", "agnostic")}
    expected |= {"train_ce/delo", "train/delo_naive", "oracle/delo_naive", "train/delo_fr1", "train_ce/delo_fr1",
                 "oracle/delo_fr1", "oracle/delo_first_layer", "agnostic/delo_first_layer",
                 "train_ce/delo_T1", "agnostic/delo_T1", "train_ce/delo_T10", "agnostic/delo_T10",
                 "train/lora_peft", "oracle/lora_peft",
                 "train/bench_shared_probe", "agnostic/bench_shared_probe"}  # no oracle: shared head
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["repeats"] == 2 and len(row["times_ms"]) == 2, name
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("median_ms", "min_ms")), name
    # every ratio the entries declare ran; the issue-13 keys keep their targets
    assert set(result["ratios"]["median"]) == set(result["ratios"]["min"]) >= ISSUE13
    assert result["ratios_skipped"] == {}
    assert all(math.isfinite(v) and v > 0 for r in result["ratios"].values() for v in r.values())
    assert set(result["targets"]) == ISSUE13 - {"infer_agnostic_pooled_over_oracle"}
    assert result["targets"]["train_full_over_ce"] == ["<=", 1.5]      # 1 + complete fraction
    assert result["targets"]["loader_over_reference"] == [">=", 3.0]
    # what a call costs in frozen forwards, counted from the backbone's linears
    fwd = {name: row.get("frozen_forwards") for name, row in rows.items()}
    assert fwd["frozen/vilt"] == 1.0 and fwd["train_ce/delo"] == 1.0
    assert fwd["train/delo"] == pytest.approx(1.5)          # L_con's proxy rows: the complete half
    assert fwd["agnostic/delo"] == pytest.approx(2.0)       # analytic reads the pooled feature
    assert fwd["agnostic/delo_first_layer"] == pytest.approx(1.0)  # routed inside the forward
    # no identifier; its frozen query pass, paid again at the second call (the one counted)
    assert fwd["agnostic/bench_shared_probe"] == pytest.approx(2.0)
    assert fwd["predict/delo"] == fwd["evaluate/delo"] == pytest.approx(2.0)
    for name in ("agnostic/delo_T1", "agnostic/delo_T10"):   # the newest session, alone
        assert rows[name]["routed_sessions"] == 1 and rows[name]["routing_accuracy"] == 1.0
    assert rows["agnostic/delo"]["routed_sessions"] == 3
    assert "routed_sessions" not in rows["agnostic/bench_shared_probe"]
    comp = result["comparison"]
    assert comp["reference"] == "delo" and set(comp["methods"]) == {
        "head_only", "delo", "lora", "bench_shared_probe"}
    assert comp["methods"]["delo"]["train"]["over_reference"] == {"median": 1.0, "min": 1.0}
    pred = result["prediction"]
    assert pred["batch"] == 64 and pred["same_predictions"] is True
    assert rows["predict/delo"]["samples"] == rows["evaluate/delo"]["samples"] == 64
    assert pred["predict_samples_per_s"]["n"] == 2 and pred["predict_samples_per_s"]["mean"] > 0
    assert result["loader"]["samples"] == 16 == rows["loader/vilt"]["samples"]
    meta = result["meta"]
    assert meta["backbone"] == "vilt" and meta["complete_fraction"] == 0.5
    assert meta["task_id"] == "analytic" and meta["versions"]["torch"] == torch.__version__
    assert meta["shape"]["backbone.tiny.hidden_size"] == 32 and meta["dtype"] == "fp32"
    printed = capsys.readouterr().out
    assert "train_delo_over_peft_lora" in printed and "predict_batch" in printed
    assert "methods against delo" in printed


def test_bench_clip_mora_merged_and_unmerged(capsys):
    result = bench.main(TINY + ["--clip", "--methods", "head_only,delo,mora",
                                "--loader-samples", "0", "--predict-batch", "0"])
    rows, ratios_ = result["rows"], result["ratios"]["median"]
    assert {"one_session/mora", "one_session/mora_unmerged", "oracle/mora", "train/mora",
            "train/delo", "agnostic/delo", "frozen/clip"} <= set(rows)
    assert {"infer one session: mora merged / unmerged",
            "infer one session: mora merged / frozen backbone",
            "infer mixed / one session: mora"} <= set(ratios_)
    # DeLo on CLIP routes by the other encoder's same-layer query: a frozen pass of both
    # encoders (without the final projections: 2 - 0.5 %)
    assert rows["oracle/delo"]["frozen_forwards"] == pytest.approx(2.0, rel=0.01)
    assert rows["one_session/mora"]["frozen_forwards"] == pytest.approx(1.0)
    trains = {m: c["trainable_params"] for m, c in result["comparison"]["methods"].items()}
    assert trains["head_only"] == 64 * 4 + 4        # the session's head: (2 x 32 projection) x 4
    assert trains["mora"] > trains["head_only"] and trains["delo"] > trains["mora"]
    assert result["meta"]["backbone"] == "clip" and result["prediction"] is None
    assert "train_delo_over_peft_lora" in result["ratios_skipped"]   # peft rows: ViLT's run
    assert "one_session/mora_unmerged" in capsys.readouterr().out


def test_methods_come_from_the_registry(probe_registered):
    chosen, left_out = cli.chosen_methods("vilt", None, [])
    assert {"head_only", "delo", "lora", "mail", "bench_shared_probe"} <= set(chosen)
    assert left_out["mora"] == "needs two_encoders"
    assert {left_out[n] for n in ("seq_lora", "seq_mail", "seq_mora")} == {"bench entry None"}
    assert "mora" in cli.chosen_methods("clip", None, [])[0]
    with pytest.raises(Exception, match="two_encoders"):   # named, it must build
        cli.chosen_methods("vilt", "delo,mora", [])


def test_bad_method_name_stops_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--methods", "no_such_method"])
    assert e.value.code == 2
    assert "no_such_method" in capsys.readouterr().err


def test_harness_arithmetic():
    assert target_value(("<=", "1 + cf"), 0.25) == ["<=", 1.25]
    assert meets(1.0, ["<=", 1.0]) and not meets(1.0, ["<", 1.0]) and meets(3.1, [">=", 3.0])
    rows = {"a/x": {"median_ms": 6.0, "min_ms": 4.0}, "b/x": {"median_ms": 3.0, "min_ms": 1.0}}
    values, skipped = ratios({"r": ("a/{backbone}", "b/x", None), "s": ("a/x", "c/x", None)},
                             rows, backbone="x")
    assert values == {"median": {"r": 2.0}, "min": {"r": 4.0}} and skipped == {"s": ["c/x"]}
    same = {"samples": 10, "times_ms": [100.0, 110.0, 90.0, 105.0]}
    slow = {"samples": 10, "times_ms": [200.0, 220.0, 180.0, 210.0]}
    assert paired_rates(same, dict(same, times_ms=[101.0, 109.0, 91.0, 104.0]))["within_noise"]
    far = paired_rates(same, slow)
    assert not far["within_noise"] and far["ratio_of_means"] == pytest.approx(2.0, rel=0.01)


def test_peft_reference_trains_only_its_lora_and_the_head():
    from delo_dist.bench.references import peft_lora
    from delo_dist.bench.rows import Setup, build_model
    setup = Setup("vilt", {"backbone.tiny.num_hidden_layers": 2}, [], 4, 2, "cpu", 0)
    lora = setup.recipe({"method.lora.rank": 3}, method="lora")
    model = build_model(setup, setup.recipe({}, method="head_only"), 2)
    extra = peft_lora(model, lora)
    assert len(extra) == 2 * 3 * 2                    # A and B on q, k, v of 2 layers
    assert all(p.shape[0] == 3 or p.shape[1] == 3 for p in extra.values())   # rank 3
    assert set(model.set_trainable(1)) == {"heads.1.weight", "heads.1.bias"}


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_throughput_command_shares_the_loader_setup():
    from delo_dist.data import throughput
    result = throughput.main(["--samples", "12", "--classes", "2", "--width", "64",
                              "--height", "48", "--image-size", "32", "--max-text-len", "12"])
    assert result["prepare"]["samples"] == 12
    assert 0 < result["read"]["samples"] <= 12   # training batches drop a last partial one


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
