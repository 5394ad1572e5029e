"""MAIL (mixture of LoRA experts) as a method, on tiny random ViLTs and the tests' shards."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import batch_of, model_for
from delo_dist.methods.mail import MailSettings
from delo_dist.models.adapters import AdaptedLinear
from delo_dist.methods.mail import MailSession, expert_counts
from delo_dist.training.engines import TorchEngine
from delo_dist.training.losses import supervised_loss
from delo_dist.training.objective import objective

LAYERS = 3
D, FF = 32, 64   # tiny_overrides: hidden 32, intermediate 64


def build(recipe_for, **extra):
    recipe = recipe_for(**{"method.name": "mail", "backbone.tiny.num_hidden_layers": LAYERS, **extra})
    return (recipe, *model_for(recipe))


def wrapped(model) -> dict[str, AdaptedLinear]:
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, AdaptedLinear)}


@pytest.mark.parametrize("variant, per_layer", [
    ("linear", ["intermediate.dense", "output.dense"]),
    ("attention", ["attention.attention.key", "attention.attention.query",
                   "attention.attention.value"]),
    ("both", ["attention.attention.key", "attention.attention.query",
              "attention.attention.value", "intermediate.dense", "output.dense"]),
])
def test_variants_wrap_the_right_linears(recipe_for, variant, per_layer):
    _, _, model = build(recipe_for, **{"method.mail.variant": variant})
    names = sorted(wrapped(model))
    expected = sorted(f"backbone.vilt.encoder.layer.{i}.{s}" for i in range(LAYERS) for s in per_layer)
    assert names == expected
    assert not any(n.endswith("attention.output.dense") for n in names)   # not an MLP linear
    assert all(isinstance(a.session_module(0), MailSession) for a in wrapped(model).values())


@pytest.mark.parametrize("allocation, counts", [
    ("square", [5, 5, 5]), ("increasing", [2, 5, 8]), ("decreasing", [8, 5, 2])])
def test_parameter_counts_per_allocation_shape(recipe_for, allocation, counts):
    """Per session: each linear (d_in, d_out) with E_l experts holds E_l LoRA pairs of rank 4
    (4 * (d_in + d_out) each) and a bias-free router (d_in * E_l)."""
    _, _, model = build(recipe_for, **{"method.mail.allocation": allocation})
    shapes = [(D, D)] * 3 + [(D, FF), (FF, D)]   # query, key, value, intermediate, output
    formula = sum(e * (4 * (i + o) + i) for e in counts for i, o in shapes)
    adapters = {n: p for n, p in model.session_parameters(0).items() if not n.startswith("heads")}
    assert sum(p.numel() for p in adapters.values()) == formula
    for name, a in wrapped(model).items():
        layer = int(re.search(r"layer\.(\d+)\.", name)[1])
        assert a.session_module(0).experts == counts[layer]
    assert expert_counts(allocation, 12, 5, 2) == {
        "square": [5] * 12, "increasing": [2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8],
        "decreasing": [8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2]}[allocation]


def mail_cfg(**kw) -> MailSettings:
    return MailSettings(**{"dropout": 0.0, **kw})


@pytest.mark.parametrize("router_input", ["sample", "token"])
def test_top_k_uses_exactly_k_experts_and_soft_merge_all(router_input):
    torch.manual_seed(0)
    x, q = torch.randn(6, 7, 16), torch.randn(6, 16)
    for routing, k, expected in [("top_k", 2, 2), ("top_k", 1, 1), ("soft_merge", 2, 5)]:
        s = MailSession(16, 12, mail_cfg(routing=routing, top_k=k, router_input=router_input), 5)
        g = s.gates(x, q)
        assert g.shape == ((6, 7, 5) if router_input == "token" else (6, 5))
        assert ((g > 0).sum(-1) == expected).all(), routing
        assert torch.allclose(g.sum(-1), torch.ones(g.shape[:-1]))
    # the delta is the gate-weighted sum of the chosen experts' (alpha / r) B_e A_e x
    s = MailSession(16, 12, mail_cfg(router_input=router_input), 5)
    torch.nn.init.normal_(s.B)
    g = s.gates(x, q)
    g = g if router_input == "token" else g[:, None].expand(6, 7, 5)
    A, B = s.A.view(5, 4, 16), s.B.view(12, 5, 4)
    by_hand = sum(g[..., e, None] * (x @ A[e].t() @ B[:, e].t()) for e in range(5)) * (8 / 4)
    assert torch.allclose(s.delta(x, None, None, q), by_hand, atol=1e-5)
    assert torch.allclose(s.delta(x, None, None, q, naive=True), by_hand, atol=1e-4)


ROUTINGS = {"top1": {"method.mail.top_k": 1}, "top2": {"method.mail.top_k": 2},
            "soft_merge": {"method.mail.routing": "soft_merge"}}


@pytest.mark.parametrize("router_input", ["sample", "token"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_routers_get_gradient_and_move(recipe_for, shards, routing, router_input):
    """B starts at zero, so step 1 gives the routers no gradient; from step 2 each router of
    each adapted linear learns (lr constant: no warmup), at every k. At top-1 the gate is
    p / p = 1 forwards: without the straight-through its gradient is 0 per sample and
    rounding noise (~1e-9) per token, far below the bound here."""
    recipe, m, model = build(recipe_for, **{"train.warmup_ratio": 0.0,
                                            "method.mail.router_input": router_input,
                                            **ROUTINGS[routing]})
    params = model.set_trainable(0)
    engine = TorchEngine(model, params, recipe.train, total_steps=100)
    routers = {n: p for n, p in params.items() if n.endswith("router.weight")}
    assert len(routers) == 5 * LAYERS
    before = {n: p.detach().clone() for n, p in routers.items()}
    batch = batch_of(model, m, shards, 0)
    grads = []
    for _ in range(3):
        logits = engine(batch, session=0)["logits"]
        engine.backward(supervised_loss(logits, batch, model.local_index[0], False))
        grads.append({n: p.grad.abs().sum().item() for n, p in routers.items()})
        engine.step()
    assert all(g == 0 for g in grads[0].values())
    low = min(grads[2].values())
    assert low > 1e-4, f"a router got (almost) no gradient at step 3: {low:.2e}"
    assert all(not torch.equal(p.detach(), before[n]) for n, p in routers.items())


def test_top1_gate_is_one_forwards_and_carries_the_router_probability_backwards():
    """The forward value of the top-1 gate is exactly 1 (Eq. 5-6 with one chosen expert);
    its gradient is that of p, so d loss / d W_r equals the gradient of the same loss
    written with g = p (checked against that form)."""
    torch.manual_seed(0)
    x, q = torch.randn(6, 7, 16), torch.randn(6, 16)
    s = MailSession(16, 12, mail_cfg(top_k=1), 5)
    torch.nn.init.normal_(s.B)
    g = s.gates(x, q)
    assert torch.equal(g.max(-1).values, torch.ones(6)) and ((g > 0).sum(-1) == 1).all()
    s.delta(x, None, None, q).square().sum().backward()
    straight_through = s.router.weight.grad.clone()
    assert straight_through.abs().sum() > 1e-2
    # the same gradient by hand: gate p_e on the chosen expert e, value held at 1 forwards
    s.router.weight.grad = None
    p = s.router(q).softmax(-1)
    e = p.argmax(-1)
    A, B = s.A.view(5, 4, 16), s.B.view(12, 5, 4)
    expert_out = torch.stack([x @ A[i].t() @ B[:, i].t() for i in range(5)], 1) * 2.0  # (B, E, N, o)
    chosen = expert_out[torch.arange(6), e]                                     # (B, N, o)
    pe = p.gather(1, e[:, None])[:, :, None]
    out = chosen * (pe - pe.detach() + 1.0)
    out.square().sum().backward()
    assert torch.allclose(s.router.weight.grad, straight_through, rtol=1e-4, atol=1e-6)


def test_balance_loss_enters_the_objective(recipe_for, shards):
    recipe, m, model = build(recipe_for, **{"method.mail.balance": 0.5})
    model.set_trainable(0)
    batch = batch_of(model, m, shards, 0)
    loss, parts = objective(model, model, batch, 0, epoch=0)
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * 1.0, abs=0.5)   # E sum f P ~ 1
    assert loss.item() > parts["ce"] + 0.5 * 0.99                           # >= 1 (Cauchy-Schwarz)


@pytest.mark.parametrize("routing", ["top_k", "soft_merge"])
def test_balance_loss_measures_imbalance_under_every_routing(routing):
    """Soft merge gives every expert every unit, so a share of the top-k slots would be 1/E
    for each whatever the router (the loss constant at 1). Its slot shares are the gates:
    the loss is E sum_e P_e^2 = 1 + E sum_e (P_e - 1/E)^2, and it moves with the router."""
    torch.manual_seed(0)
    x, q = torch.randn(6, 7, 16), torch.randn(6, 16)
    values = []
    for seed in range(3):
        torch.manual_seed(seed)
        s = MailSession(16, 12, mail_cfg(routing=routing, balance=1.0), 5)
        s.gates(x, q)
        loss = s.balance_loss
        loss.backward()
        assert s.router.weight.grad.abs().sum() > 1e-4
        assert loss.item() >= 1.0 - 1e-6
        if routing == "soft_merge":
            P = s.router(q).softmax(-1).mean(0)
            assert loss.item() == pytest.approx(1 + 5 * ((P - 0.2) ** 2).sum().item(), rel=1e-5)
        values.append(loss.item())
    assert len({round(v, 6) for v in values}) == 3          # different routers, different losses
    with torch.no_grad():   # a router that gives every unit the same uniform gates: exactly 1
        s.router.weight.zero_()
    s.gates(x, q)
    assert s.balance_loss.item() == pytest.approx(1.0, abs=1e-6)


def predictions(model, batch, session):
    model.eval()
    model.set_batch(batch)
    model.ctx.uniform_session, model.ctx.session = session, None
    with torch.no_grad():
        return model.heads[session](model.backbone(batch))


def train_steps(model, recipe, batch, k, steps=3):
    params = model.set_trainable(k)
    engine = TorchEngine(model, params, recipe.train, total_steps=100)
    for _ in range(steps):
        model.train()
        engine.backward(supervised_loss(engine(batch, session=k)["logits"], batch, model.local_index[k], False))
        engine.step()


def session_state(model, k: int) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.session_parameters(k).items()}


@pytest.mark.parametrize("method, isolated", [("mail", True), ("seq_mail", False)])
def test_session_isolation_for_mail_and_drift_for_seq_mail(recipe_for, shards, method, isolated):
    """Session 0's tensors are bit-identical after training session 1 (mail), its outputs
    equal up to float noise (two identical CPU forwards here differ by ~1e-7: BLAS picks
    kernels by memory alignment); with seq_mail the one mixture moves under session 0."""
    recipe, m, model = build(recipe_for, **{"method.name": method, "train.warmup_ratio": 0.0})
    b0, b1 = batch_of(model, m, shards, 0), batch_of(model, m, shards, 1)
    train_steps(model, recipe, b0, 0)
    out0, state0 = predictions(model, b0, 0), session_state(model, 0)
    train_steps(model, recipe, b1, 1)
    after, state1 = predictions(model, b0, 0), session_state(model, 0)
    shared = {id(a.session_module(0)) == id(a.session_module(1)) for a in model.adapted}
    assert shared == {not isolated}
    assert state0.keys() == state1.keys() and len(state0) == 3 * 5 * LAYERS + 2
    changed = [n for n in state0 if not torch.equal(state0[n], state1[n])]
    if isolated:
        assert changed == []                       # to the bit
        assert torch.allclose(after, out0, rtol=0, atol=1e-6)
    else:
        assert len(changed) == 3 * 5 * LAYERS      # every A, B and router; not the head
        assert (after - out0).abs().max() > 1e-3   # the shared mixture moved under session 0


@pytest.mark.slow
def test_mail_trains_end_to_end(recipe_for):
    from delo_dist.training.trainer import Trainer
    recipe, *_ = build(recipe_for, **{"data.sessions": 2, "backbone.tiny.num_hidden_layers": 2,
                                      "method.mail.routing": "soft_merge"})
    assert Trainer(recipe).run() == 0
    import json
    res = json.loads(open(recipe.output_dir + "/metrics.json").read())
    assert res["method"] == "mail" and [len(r) for r in res["accuracy_matrix"]] == [1, 2]
    assert res["oracle_fg"] == 0.0     # sessions isolated: only routing can forget
    per_session = res["sessions"][0]["trainable_params"]
    head = D * 4 + 4
    assert per_session == head + 2 * 5 * sum(4 * (i + o) + i for i, o in [(D, D)] * 3 + [(D, FF), (FF, D)])


def test_recipe_rejects_bad_mail_keys(recipe_for):
    from delo_dist.config import RecipeError
    with pytest.raises(RecipeError, match="method.mail.top_k"):
        recipe_for(**{"method.name": "mail", "method.mail.top_k": 6})
    with pytest.raises(RecipeError, match="method.mail.variant"):
        recipe_for(**{"method.mail.variant": "mlp"})


def test_unmatched_targets_are_named():
    from delo_dist.methods.mail import mail_targets
    with pytest.raises(ValueError, match="method.mail.variant='linear'"):
        mail_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), SimpleNamespace(variant="linear"))


@pytest.mark.parametrize("variant", ["linear", "both"])
def test_mail_on_clip_routes_its_mlp_linears_by_the_sequence_mean(recipe_for, shards, variant):
    """CLIP's MLP linears are wider than its attention ones, and each encoder sees one
    modality: MAIL's per-sample router reads the mean of the encoder's own tokens at that
    linear, whatever its width (the sweep's MAIL-on-CLIP runs failed before on this)."""
    recipe, m, model = build(recipe_for, **{"backbone.name": "clip",
                                            "backbone.tiny.text_hidden_size": 24,
                                            "method.mail.variant": variant})
    fc = [n for n in wrapped(model) if n.endswith(("mlp.fc1", "mlp.fc2"))]
    assert fc and all(("text_model" in n) or ("vision_model" in n) for n in fc)
    params = model.set_trainable(0)
    with torch.no_grad():  # LoRA's zero B would give the routers no gradient at step 0
        for n, p in params.items():
            if "router" not in n and "heads" not in n:
                p.add_(0.05 * torch.randn_like(p))
    batch = batch_of(model, m, shards, 0)
    loss, parts = objective(model, model, batch, 0, epoch=0)
    assert torch.isfinite(loss)
    loss.backward()
    routers = [p for n, p in params.items() if "router" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize("backbone, method, expected", [
    ("vilt", "mail", "zeros"), ("vilt", "delo", "ones"),     # MAIL's paper; DeLo keeps MAP's
    ("clip", "mail", "zeros"), ("clip", "mora", "white"),    # MoRA's code: a white image
])
def test_missing_image_is_the_methods_dummy(recipe_for, shards, backbone, method, expected):
    """The dummy of a missing image is the method's (MAIL: zeros after normalisation, as the
    paper's example), the backbone applying it; a missing text is "" for every method."""
    _, m, model = build(recipe_for, **{"backbone.name": backbone, "method.name": method})
    batch = batch_of(model, m, shards, 0)
    missing = batch["missing_image"]
    assert missing.any() and (~missing).any()
    dummy = batch["pixel_values"][missing]
    ones = torch.ones_like(dummy[0])
    want = {"zeros": torch.zeros_like(ones), "ones": ones,
            "white": model.backbone.normalize_pixels(ones)}[expected]
    assert all(torch.equal(d, want) for d in dummy)
    assert not torch.equal(batch["pixel_values"][~missing][0], want)
    # MAIL routes by its own input: a two-encoder backbone computes no guide query for it
    assert model.backbone.guide_queries == (method == "delo")
