"""DeLo, mechanism by mechanism, on tiny random ViLTs (and the real ViLT-B/32 shapes on the
meta device for the parameter counts of the paper's Table 5)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import batch_of, model_for
from delo_dist.ablations import DELO_VARIANTS, overrides_for
from delo_dist.config import load_recipe
from delo_dist.data.stream import SessionStream
from delo_dist.models.adapters import (PROXY_IMAGE, PROXY_TEXT, AdaptedLinear, RoutingContext,
                                       masked_mean, routing_queries)
from delo_dist.models.continual import ContinualModel
from delo_dist.methods.delo import FactorPool
from delo_dist.models.task_id import TaskKeyMemory
from delo_dist.training.engines import TorchEngine
from delo_dist.training.objective import observe_task_id
from delo_dist.methods.delo import alignment_sum, consistency_sum, proxy_choice
from delo_dist.training.losses import supervised_loss


def build(recipe_for, **extra):
    recipe = recipe_for(**extra)
    return (recipe, *model_for(recipe))


def test_forward_is_the_hard_top_r_selection():
    """Gates are 1 in the forward pass: the update is exactly sum_i b_(i) (a_(i) . h)."""
    torch.manual_seed(0)
    pool = FactorPool(12, 10, experts=6, rank=3, factor_rank=1)
    torch.nn.init.normal_(pool.B)
    x, q = torch.randn(4, 5, 12), torch.randn(4, 12)
    _, _, gate, top_a, top_b = pool.route(q)
    assert torch.equal(gate, torch.ones_like(gate))
    expected = torch.stack([
        sum(torch.outer(pool.B[top_b[s, i], :, 0], pool.A[top_a[s, i], 0]) for i in range(3))
        for s in range(4)])                                   # (B, d_out, d_in), by hand
    assert torch.allclose(pool.delta(x, q), torch.einsum("bnd,bod->bno", x, expected), atol=1e-5)
    assert len(set(top_a[0].tolist())) == 3                   # r distinct factors per sample


def test_routers_and_compat_receive_gradient_and_move(recipe_for, shards):
    """B starts at zero (routers, compat and A get exactly zero gradient then) and warmup
    starts at lr 0: step 1 changes nothing, step 2 moves B, from step 3 every router learns."""
    recipe, m, model = build(recipe_for)
    params = model.set_trainable(0)
    engine = TorchEngine(model, params, recipe.train, total_steps=10)
    batch = batch_of(model, m, shards, 0)
    routers = {n: p for n, p in params.items() if "router" in n or "compat" in n}
    assert len(routers) == 6 * 2 * 5   # 6 linears x 2 pools x (router_a w/b, router_b w/b, compat)
    before = {n: p.detach().clone() for n, p in routers.items()}
    grads = []
    for _ in range(3):
        logits = engine(batch, session=0)["logits"]
        engine.backward(supervised_loss(logits, batch, model.local_index[0], False))
        grads.append({n: p.grad.abs().sum().item() for n, p in routers.items()})
        engine.step()
    assert all(g == 0 for g in grads[0].values())
    assert all(g > 0 for g in grads[2].values()), "a router got no gradient at step 3"
    moved = [n for n, p in routers.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(routers)


# Per-session trainable parameters of the paper's Table 5 (ViLT-B/32, adapters on q/k/v of
# 12 layers, two pools each), with the official block shape factor_rank = r.
@pytest.mark.parametrize("E, r, millions", [(16, 2, 7.1), (16, 4, 12.4), (16, 8, 23.0),
                                            (32, 2, 14.2), (32, 4, 24.8), (32, 8, 46.0)])
def test_table5_parameter_counts_on_vilt_b32(E, r, millions):
    vilt_b32 = {"backbone.tiny.hidden_size": 768, "backbone.tiny.num_hidden_layers": 12,
                "backbone.tiny.num_attention_heads": 12, "backbone.tiny.intermediate_size": 3072,
                "backbone.tiny.patch_size": 32, "backbone.image_size": 384,
                "backbone.max_text_len": 40, "method.delo.experts": E, "method.delo.rank": r}
    counts = {}
    for f in (r, 1):
        recipe = load_recipe(None, ["data.make_synthetic=true"] +
                             [f"{k}={v}" for k, v in {**vilt_b32, "method.delo.factor_rank": f}.items()])
        with torch.device("meta"):
            model = ContinualModel(recipe, [list(range(10))] * 2, 20)
        adapters = {n: p for n, p in model.session_parameters(0).items() if not n.startswith("heads")}
        counts[f] = sum(p.numel() for p in adapters.values())
        assert len(model.adapted) == 36
    per_pool = 2 * E * r * 768 + 2 * (768 * E + E) + r * 768 * E
    assert counts[r] == 72 * per_pool and round(counts[r] / 1e6, 1) == millions
    assert counts[1] == 72 * (2 * E * 768 + 2 * (768 * E + E) + r * 768 * E)  # rank-one pairs


def test_cross_modal_guide_routes_each_missing_sample_with_the_other_query():
    ctx = RoutingContext(missing_text=torch.tensor([True, False, False]),
                         missing_image=torch.tensor([False, True, False]))
    q_v, q_t = torch.randn(3, 4), torch.randn(3, 4)
    route_v, route_t = routing_queries(ctx, q_v, q_t)
    assert torch.equal(route_t[0], q_v[0]) and torch.equal(route_v[0], q_v[0])  # no text
    assert torch.equal(route_v[1], q_t[1]) and torch.equal(route_t[1], q_t[1])  # no image
    assert torch.equal(route_v[2], q_v[2]) and torch.equal(route_t[2], q_t[2])  # complete
    ctx.proxy = torch.tensor([0, 0, PROXY_TEXT])                                # L_con's pass
    assert torch.equal(routing_queries(ctx, q_v, q_t)[1][2], q_v[2])
    ctx.proxy = torch.tensor([0, 0, PROXY_IMAGE])
    assert torch.equal(routing_queries(ctx, q_v, q_t)[0][2], q_t[2])
    ctx.cross_modal_guide = False                                               # ablation
    assert routing_queries(ctx, q_v, q_t) == (q_v, q_t)


def test_adapted_linear_applies_the_guide_per_sample_in_a_mixed_batch(recipe_for):
    cfg = recipe_for().method.settings
    torch.manual_seed(1)
    from delo_dist.methods.delo import DeloSession
    ctx = RoutingContext()
    layer = AdaptedLinear(torch.nn.Linear(8, 6), ctx, lambda name: DeloSession(8, 6, cfg), ["0"])
    for p in layer.sessions["0"].parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 7, 8)
    ctx.text_tokens = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 3, dtype=torch.bool)
    ctx.image_tokens = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3, dtype=torch.bool)
    ctx.missing_text, ctx.missing_image = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    ctx.uniform_session = 0
    out = layer(x)
    s = layer.sessions["0"]
    q_v, q_t = masked_mean(x, ctx.image_tokens), masked_mean(x, ctx.text_tokens)
    for b, (rv, rt) in enumerate([(q_v[0], q_v[0]), (q_t[1], q_t[1]), (q_v[2], q_t[2])]):
        want = layer.base(x[b:b + 1]) + s.delta(x[b:b + 1], rv[None], rt[None], None)
        assert torch.allclose(out[b:b + 1], want, atol=1e-5), f"sample {b}"


def test_task_key_ema_is_equation_7_per_modality():
    mem = TaskKeyMemory(3, 2, momentum=0.9, modalities=2)
    mem.update(1, torch.tensor([[1.0, 0.0], [4.0, 0.0]]), torch.tensor([1, 2]))   # means (1,0), (2,0)
    mem.update(1, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([1, 0]))   # no text: kept
    assert torch.allclose(mem.keys[1, 0], torch.tensor([0.09, 0.1]))
    assert torch.allclose(mem.keys[1, 1], torch.tensor([0.2, 0.0]))
    assert mem.updates[1].tolist() == [2, 1] and mem.keys[0].abs().sum() == 0
    mem.update(0, torch.tensor([[0.0, -1.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    # session 0: visual (0,-1), textual (0,1); session 1: visual ~(0.9,1), textual (1,0)
    q = torch.tensor([[[0.0, -1.0], [1.0, 0.0]],     # image says 0, text says 1
                      [[0.0, -1.0], [9.0, 9.0]],     # text missing: the image decides -> 0
                      [[5.0, 5.0], [1.0, 0.1]]])     # image missing: the text decides -> 1
    present = torch.tensor([[True, True], [True, False], [False, True]])
    assert mem.select(q, present, seen=2).tolist()[1:] == [0, 1]
    assert mem.select(q, present, seen=1).tolist() == [0, 0, 0]   # unseen sessions never chosen


def test_mixed_session_batch_is_routed_and_predicted_per_sample(recipe_for, shards):
    """Keys from each session's training queries; a test batch mixing three sessions routes
    every sample by itself (no batch-level vote), and predicts as it would alone."""
    _, m, model = build(recipe_for, **{"task_id.source": "first_layer"})   # every source: test_task_id.py
    model.eval()
    for k in range(3):
        for b in SessionStream(shards, m, k, "train", 16, model.backbone.collate, {}, train=False):
            observe_task_id(model, b, k)
    parts = [batch_of(model, m, shards, k, "test", n=6) for k in range(3)]
    mixed = {key: (torch.cat([p[key] for p in parts]) if torch.is_tensor(parts[0][key])
                   else sum((p[key] for p in parts), [])) for key in parts[0]}
    out = model.predict(mixed, seen=3)
    routing_accuracy = (out["routed"] == mixed["session"]).float().mean().item()
    assert routing_accuracy > 0.8   # 3 sessions: chance is 1/3
    from delo_dist.models.inputs import subset
    for i in range(18):
        alone = model.predict(subset(mixed, torch.tensor([i])), seen=3)
        assert alone["routed"].item() == out["routed"][i].item()
        assert alone["pred"].item() == out["pred"][i].item()
        assert alone["oracle_pred"].item() == out["oracle_pred"][i].item()
    # the oracle differs only where routing was wrong, and a misrouted sample is always wrong
    wrong = out["routed"] != mixed["session"]
    assert torch.equal(out["pred"][~wrong], out["oracle_pred"][~wrong])
    assert not (out["pred"][wrong] == mixed["labels"][wrong]).any()


def test_auxiliary_losses():
    q = torch.randn(5, 8)
    complete = torch.tensor([True, True, False, True, False])
    assert alignment_sum([(q, q)], complete).abs() < 1e-6
    assert alignment_sum([(q, -q)], complete).item() == pytest.approx(2.0 * 3)  # 1 - cos = 2
    logits = torch.randn(4, 5)
    assert consistency_sum(logits, logits, False).abs() < 1e-6
    assert consistency_sum(logits, logits.flip(0), False) > 0
    assert consistency_sum(logits, logits, True).abs() < 1e-5
    keys = [f"s00-train-{i:07d}" for i in range(200)]
    choice = proxy_choice(keys, epoch=0)
    assert torch.equal(choice, proxy_choice(keys, epoch=0))
    assert 60 < (choice == PROXY_TEXT).sum() < 140 and set(choice.tolist()) == {PROXY_TEXT, PROXY_IMAGE}


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_training_session_1_leaves_session_0_bit_identical(recipe_for):
    """Hash every tensor of session 0 (adapters, head, task key) after session 0 and after
    session 1, from the real checkpoints: they must be equal to the bit."""
    from safetensors.torch import load_file
    from delo_dist.training.trainer import Trainer
    recipe = recipe_for(**{"data.sessions": 2, "task_id.source": "first_layer"})  # EMA keys
    assert Trainer(recipe).run() == 0
    ckpt = recipe.output_dir + "/checkpoints"
    after0 = load_file(f"{ckpt}/session_00/model.safetensors")
    after1 = load_file(f"{ckpt}/session_01/model.safetensors")
    s0 = [n for n in after0 if ".sessions.0." in n or n.startswith("heads.0.")]
    s1 = [n for n in after0 if ".sessions.1." in n or n.startswith("heads.1.")]
    assert len(s0) == 6 * 2 * 7 + 2
    for n in s0:
        assert torch.equal(after0[n], after1[n]), n
    assert torch.equal(after0["identifier.keys"][0], after1["identifier.keys"][0])
    assert any(not torch.equal(after0[n], after1[n]) for n in s1)     # session 1 did train
    assert not torch.equal(after0["identifier.keys"][1], after1["identifier.keys"][1])


@pytest.mark.slow  # trains or launches a process: not in the fast loop
@pytest.mark.parametrize("variant", sorted(DELO_VARIANTS))  # MAIL's: tests/test_ablations.py
def test_every_variant_runs_and_reports_three_views(recipe_for, variant):
    from delo_dist.training.trainer import Trainer
    extra = dict(o.split("=", 1) for o in overrides_for(variant, rank=2))
    recipe = recipe_for(**{"data.sessions": 2, **extra})
    assert Trainer(recipe).run() == 0
    res = json.loads(open(recipe.output_dir + "/metrics.json").read())
    assert [len(r) for r in res["accuracy_matrix"]] == [1, 2]
    for k, row in enumerate(res["accuracy_matrix"]):
        for i, acc in enumerate(row):
            # misrouted samples are always wrong: agnostic <= routing and agnostic <= oracle
            assert acc <= res["oracle_matrix"][k][i] + 1e-9
            assert acc <= res["routing_matrix"][k][i] + 1e-9
    assert res["routing_matrix"][0] == [1.0]     # one session seen: routing is trivial
    assert res["ap"] == pytest.approx(sum(res["accuracy_matrix"][-1]) / 2)   # AP: the last row
    assert res["method"] == recipe.method.name


def test_ablations_command_writes_a_table(shards, tmp_path):
    from delo_dist.ablations import run
    from tests.conftest import REPO, tiny_overrides
    rows = run(str(REPO / "recipes" / "quickstart.yaml"),
               tiny_overrides(shards, tmp_path / "abl", **{"data.sessions": 2}),
               only=["delo", "head_only"])
    assert [r["variant"] for r in rows] == ["delo", "head_only"]
    text = (tmp_path / "abl" / "ablations" / "table.md").read_text()
    lines = text.splitlines()
    assert [sum(line.startswith(f"| {v} |") for line in lines) for v in ("delo", "head_only")] == [2, 2]
    assert f"{100 * rows[0]['ap']:.2f}" in text       # one row in each table: main, by availability
    assert rows[0]["oracle_fg"] == 0.0      # DeLo's sessions are isolated: only routing forgets


@pytest.mark.parametrize("method", ["lora", "delo"])
def test_targets_may_include_a_linear_outside_the_encoder_layers(recipe_for, method):
    """backbone.targets [dense] also matches ViLT's pooler.dense, which sits in no encoder
    layer: LoRA and DeLo adapt it (only MoRA reads where a linear sits)."""
    recipe = recipe_for(**{"method.name": method, "backbone.targets": "[dense]"})
    _, model = model_for(recipe)
    names = {n for n, m in model.backbone.named_modules() if isinstance(m, AdaptedLinear)}
    assert any(n.endswith("pooler.dense") for n in names)
    assert any(".encoder.layer." in n for n in names)
