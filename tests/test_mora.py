"""MoRA on tiny random CLIPs (text width 24, image width 32): the Gram coupling against its
formula, the DoRA-style magnitudes, the activation path against the formed weight, merged
inference against unmerged, which linears are adapted, and the continual variants
(isolation between sessions for mora, drift for seq_mora)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import batch_of, model_for
from delo_dist.models.continual import ContinualModel
from delo_dist.methods.mora import MoraSession
from delo_dist.training.engines import TorchEngine
from delo_dist.training.losses import supervised_loss
from tests.conftest import REPO

CLIP = {"backbone.name": "clip", "backbone.tiny.text_hidden_size": 24}


def build(recipe_for, method="mora", **extra):
    recipe = recipe_for(**{**CLIP, "method.name": method, **extra})
    return (recipe, *model_for(recipe))


def sessions_of(model, k) -> dict[str, MoraSession]:
    return {n: a.session_module(k) for n, a in zip(_names(model), model.adapted)}


def _names(model):
    ids = {id(a): n for n, a in model.named_modules()}
    return [ids[id(a)] for a in model.adapted]


def perturb(model, k, std=0.2):
    """Move session k's updates away from their initial values (B starts at zero)."""
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for s in sessions_of(model, k).values():
            for p in s.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_adapts_key_and_value_of_the_upper_layers_of_both_encoders(recipe_for):
    _, _, model = build(recipe_for)
    names = _names(model)
    assert len(names) == 4 and all(".layers.1.self_attn." in n for n in names)  # top of 2 layers
    assert {n.rsplit(".", 1)[1] for n in names} == {"k_proj", "v_proj"}
    assert sum("text_model" in n for n in names) == 2
    assert not model.backbone.guide_queries  # MoRA routes nothing: no guide pass is run
    _, _, every = build(recipe_for, **{"method.mora.layers_from": 0})
    assert len(every.adapted) == 8
    with pytest.raises(ValueError) as e:   # the method's needs against the backbone's capabilities
        build(recipe_for, **{"backbone.name": "vilt"})
    assert str(e.value).startswith("command line: override '")   # both came from there
    assert "'mora' needs the backbone capability 'two_encoders'" in str(e.value)


def test_gram_coupling_equals_the_formula(recipe_for):
    """Text gets A (B^T B) A^T, image gets B (A^T A) B^T, from one shared pair per layer."""
    _, _, model = build(recipe_for)
    sess = sessions_of(model, 0)
    text = next(s for n, s in sess.items() if "text_model" in n and n.endswith("k_proj"))
    image = next(s for n, s in sess.items() if "vision_model" in n and n.endswith("k_proj"))
    value = next(s for n, s in sess.items() if "vision_model" in n and n.endswith("v_proj"))
    assert text.shared is image.shared is value.shared
    A, B = text.shared.factors["text"], text.shared.factors["image"]
    assert A.shape == (24, 8) and B.shape == (32, 8)  # rank 8, each encoder's own width
    assert torch.allclose(text.shared_update(), A @ (B.t() @ B) @ A.t(), atol=1e-5)
    assert torch.allclose(image.shared_update(), B @ (A.t() @ A) @ B.t(), atol=1e-5)
    # the coupling carries gradient across encoders: a loss on the text side moves B
    x = torch.randn(2, 5, 24)
    text.delta(x).square().sum().backward()
    assert B.grad is not None and B.grad.abs().sum() > 0


def test_magnitudes_and_activation_path_match_the_formed_weight(recipe_for):
    _, _, model = build(recipe_for)
    perturb(model, 0)
    model.eval()
    for s in sessions_of(model, 0).values():
        base = s._base[0]
        w0 = base.weight
        with torch.no_grad():
            s.m_shared.mul_(1.5)
        ws = w0 + s.alpha * s.shared_update().t()
        wp = w0 + s.alpha * (s.A @ s.B).t()
        expected = s.m_shared * ws / ws.norm(dim=0) + s.m_specific * wp / wp.norm(dim=0)
        assert torch.allclose(s.merged_weight(), expected, atol=1e-5)
        n_s, n_p = s.column_norms(w0)
        assert torch.allclose(n_s, ws.norm(dim=0), rtol=1e-4)
        assert torch.allclose(n_p, wp.norm(dim=0), rtol=1e-4)
        x = torch.randn(3, 7, base.in_features)
        with torch.no_grad():  # evaluation: no dropout, the activation path is exact
            assert torch.allclose(base(x) + s.delta(x), F.linear(x, expected, base.bias), atol=1e-4)


def test_magnitudes_start_at_the_frozen_column_norms_and_learn(recipe_for, shards):
    recipe, m, model = build(recipe_for)
    for s in sessions_of(model, 0).values():
        norms = s._base[0].weight.norm(dim=0)
        assert torch.allclose(s.m_shared, norms) and torch.allclose(s.m_specific, norms)
        assert torch.equal(s.B, torch.zeros_like(s.B))
    params = model.set_trainable(0)
    assert {n.rsplit(".", 1)[1] for n in params if "sessions" in n} == {
        "m_shared", "m_specific", "A", "B", "text", "image"}
    batch = batch_of(model, m, shards, 0)
    model.train()
    supervised_loss(model.session_forward(batch, 0), batch, model.local_index[0], False).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in params.items() if n.endswith(("m_shared", "m_specific")))


def test_mora_starts_one_full_weight_away_from_the_frozen_model(recipe_for, shards):
    """MoRA's documented start (the MoRA code's initialisation): with B = 0 the specific term
    m_p dir(W0) is W0 itself, and the shared term adds m_s dir(W0 + alpha S), a second copy of
    W0's column norms in the direction of W0 + alpha S: W' - W0 = ||W0||_col dir(W0 + alpha S),
    whose Frobenius norm is ||W0||_F exactly, whatever S. So the relative change is 1 in every
    adapted linear (about 2 W0 when alpha S is small beside W0), and the model's output moves
    (pooled features by 0.25 of their norm on this tiny CLIP)."""
    _, m, model = build(recipe_for)
    for s in sessions_of(model, 0).values():
        w0 = s._base[0].weight
        ws = w0 + s.alpha * s.shared_update().t()
        with torch.no_grad():
            change = s.merged_weight() - w0
        assert torch.allclose(change, w0.norm(dim=0) * ws / ws.norm(dim=0), atol=1e-6)
        assert (change.norm() / w0.norm()).item() == pytest.approx(1.0, abs=1e-5)
    batch = batch_of(model, m, shards, 0)
    model.eval()
    model.set_batch(batch)
    model.ctx.uniform_session, model.ctx.session = 0, None
    with torch.no_grad():
        adapted = model.backbone(batch)
        model.ctx.enabled = False
        frozen = model.backbone(batch)
        model.ctx.enabled = True
    assert (adapted - frozen).norm() / frozen.norm() > 0.05


def test_merged_inference_equals_unmerged(recipe_for, shards):
    """Merged weights (one F.linear per adapted linear) and the activation path agree for each
    session; a batch mixing sessions (activation path, per-session sub-batches inside each
    adapted linear) predicts as each sample's own merged session does."""
    _, m, model = build(recipe_for)
    for k in range(3):
        perturb(model, k)
    batch = batch_of(model, m, shards, 0, n=12)
    model.eval()
    per_session = []
    for k in range(3):
        with torch.no_grad():
            merged = model._merged_pooled(batch, k)
            unmerged = model.session_forward(batch, k)  # training forward: activation path
        per_session.append(merged)
        assert torch.allclose(model.heads[k](merged), unmerged, atol=1e-5), \
            (model.heads[k](merged) - unmerged).abs().max()
    mixed = torch.arange(12) % 3
    model.set_batch(batch)
    model.ctx.session, model.ctx.uniform_session = mixed, None
    with torch.no_grad():
        pooled = model.backbone(batch)
    expected = torch.stack([per_session[int(k)][i] for i, k in enumerate(mixed)])
    assert torch.allclose(pooled, expected, atol=1e-5)
    for sessions in (torch.zeros(12, dtype=torch.long), mixed):
        model.merged_inference = True
        a = model.predict_with(batch, sessions)
        model.merged_inference = False
        assert torch.equal(a, model.predict_with(batch, sessions))
    # the frozen weights themselves are never changed by merging
    w = {n: p.clone() for n, p in model.backbone.clip.named_parameters() if "sessions" not in n}
    model.merged_inference = True
    model.predict_with(batch, torch.zeros(12, dtype=torch.long))
    assert all(torch.equal(p, w[n]) for n, p in model.backbone.clip.named_parameters() if n in w)


def _train_session(model, recipe, batch, k, steps=3):
    engine = TorchEngine(model, model.set_trainable(k), recipe.train, total_steps=steps + 1)
    for _ in range(steps):
        model.train()
        engine.backward(supervised_loss(engine(batch, session=k)["logits"], batch, model.local_index[k], False))
        engine.step()


@pytest.mark.parametrize("method", ["mora", "seq_mora"])
def test_isolation_for_mora_and_drift_for_seq_mora(recipe_for, shards, method):
    recipe, m, model = build(recipe_for, method)
    b0, b1 = batch_of(model, m, shards, 0), batch_of(model, m, shards, 1)
    _train_session(model, recipe, b0, 0)
    model.eval()
    with torch.no_grad():
        before = model.predict_with(b0, torch.zeros(8, dtype=torch.long)), model.session_forward(b0, 0)
    _train_session(model, recipe, b1, 1)
    model.eval()
    with torch.no_grad():
        after = model.predict_with(b0, torch.zeros(8, dtype=torch.long)), model.session_forward(b0, 0)
    if method == "mora":
        assert torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])
    else:  # one shared set: training session 1 moves session 0's features
        assert not torch.allclose(after[1], before[1], atol=1e-6)


def test_food101_clip_recipe_has_the_papers_trainable_share(shards):
    """CLIP ViT-B/16 shapes on the meta device (random, no hub) with recipes/food101_clip.yaml:
    q/v projections of layers 10-11 of both encoders at rank 4 give 61,440 adapter
    parameters; with a 101-class head that is the MoRA paper's 0.11 % of the backbone."""
    from delo_dist.config import load_recipe
    from delo_dist.models.continual import parameter_summary
    vit_b16 = {"backbone.pretrained": "null", "backbone.image_size": 224,
               "backbone.tiny.hidden_size": 768, "backbone.tiny.num_hidden_layers": 12,
               "backbone.tiny.num_attention_heads": 12, "backbone.tiny.intermediate_size": 3072,
               "backbone.tiny.patch_size": 16, "backbone.tiny.text_hidden_size": 512,
               "backbone.tiny.text_num_attention_heads": 8, "backbone.tiny.text_intermediate_size": 2048,
               "backbone.tiny.text_vocab_size": 49408, "backbone.tiny.projection_dim": 512}
    recipe = load_recipe(REPO / "recipes" / "food101_clip.yaml",
                         [f"data.shards={shards}"] + [f"{k}={v}" for k, v in vit_b16.items()])
    with torch.device("meta"):
        model = ContinualModel(recipe, [list(range(10 * k, 10 * k + 10)) for k in range(10)], 100)
    counts = parameter_summary(model)
    assert counts["backbone_params"] == 149_620_737           # CLIP ViT-B/16
    per_layer = (512 + 768) * 4 + 2 * (512 * 8 + 2 * 512) + 2 * (768 * 8 + 2 * 768)
    assert counts["adapter_params_per_session"] == 2 * per_layer == 61_440
    head_101 = 1024 * 101 + 101
    assert round(100 * (61_440 + head_101) / counts["backbone_params"], 2) == 0.11
