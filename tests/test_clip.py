"""CLIP as a second backbone, on tiny random CLIPConfigs (text width 24, image width 32, so a
cross-encoder query really changes width): inputs and dummies, DeLo on two encoders
(trainable set, routing, cross-modal guide, isolation), task keys, from_pretrained, and the
quickstart end to end with backbone.name=clip."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.helpers import batch_of, model_for
from delo_dist.data.shards import read_manifest
from delo_dist.models.adapters import RoutingContext
from delo_dist.models.continual import parameter_summary
from delo_dist.training.engines import TorchEngine
from delo_dist.training.losses import supervised_loss
from delo_dist.training.objective import observe_task_id
from tests.conftest import REPO, tiny_overrides

CLIP = {"backbone.name": "clip", "backbone.tiny.text_hidden_size": 24}
WHITE = [(1 - m) / s for m, s in zip((0.48145466, 0.4578275, 0.40821073),
                                     (0.26862954, 0.26130258, 0.27577711))]


def build(recipe_for, **extra):
    recipe = recipe_for(**{**CLIP, **extra})
    return (recipe, *model_for(recipe))


def test_inputs_dummies_and_pooled_shape(recipe_for, shards):
    _, m, model = build(recipe_for)
    bb = model.backbone
    model.ctx.enabled = False  # the frozen CLIP alone
    batch = batch_of(model, m, shards, 0, n=16)
    assert batch["missing_image"].any() and batch["missing_text"].any()
    # missing image: white through CLIP's normalisation, ~1.93 / 2.07 / 2.15 (ViLT: 1.0)
    white = batch["pixel_values"][batch["missing_image"]]
    for c in range(3):
        assert torch.allclose(white[:, c], torch.full_like(white[:, c], WHITE[c]), atol=1e-5)
    assert WHITE[0] == pytest.approx(1.930, abs=1e-3)
    # missing text: the empty string -> [CLS] [SEP] then padding; end-of-text id in every row
    tok, eos = bb.tokenizer, bb.clip.config.text_config.eos_token_id
    assert eos == tok.sep_token_id and eos < bb.clip.config.text_config.vocab_size and eos != 2
    empty = batch["input_ids"][batch["missing_text"]]
    assert (empty[:, :2] == torch.tensor([tok.cls_token_id, eos])).all() and (empty[:, 2:] == 0).all()
    assert ((batch["input_ids"] == eos).sum(1) == 1).all()
    # pooled = [image embeds, text embeds], each projection_dim wide
    pooled = bb(batch)
    p = bb.clip.config.projection_dim
    assert pooled.shape == (16, 2 * p) and bb.hidden_size == 2 * p
    image = bb.clip.get_image_features(pixel_values=batch["pixel_values"])
    image = image if torch.is_tensor(image) else image.pooler_output
    assert torch.allclose(pooled[:, :p], image, atol=1e-5)
    # the text half pools at the end-of-text token: changing a later pad token changes nothing
    ids = batch["input_ids"].clone()
    row = int(batch["missing_text"].nonzero()[0])
    ids[row, 5] = 7
    other = bb({**batch, "input_ids": ids})
    assert torch.allclose(other[row], pooled[row], atol=1e-6)


def test_delo_trains_only_the_active_session_in_both_encoders(recipe_for):
    _, _, model = build(recipe_for)
    names = list(model.set_trainable(1))
    assert all(".sessions.1." in n or n.startswith("heads.1.") for n in names)
    assert {p.requires_grad for n, p in model.named_parameters() if n not in names} == {False}
    assert len(model.adapted) == 2 * 2 * 3  # 2 encoders x 2 layers x q/k/v
    widths = {a.base.in_features for a in model.adapted}
    assert widths == {24, 32}  # pools sized to each encoder's own width
    assert model.backbone.guide_queries   # DeLo routes by the other modality: the guide pass runs
    for a in model.adapted:
        pool = a.session_module(1).visual
        assert pool.A.shape[-1] == a.in_features and pool.router_a.in_features == a.in_features
    summary = parameter_summary(model)
    assert summary["trainable_per_session"] == sum(p.numel() for p in model.session_parameters(1).values())
    assert summary["backbone_params"] == sum(p.numel() for p in model.backbone.clip.parameters()
                                             if not any(p is q for a in model.adapted
                                                        for q in a.sessions.parameters()))


def _record_pool_queries(model, pool_name: str, encoder: str, layer: int = 0) -> list:
    """Wrap a layer's q_proj pool of one encoder to record the query it is routed by."""
    adapted = next(a for a in model.adapted if f"{encoder}_model.encoder.layers.{layer}."
                   in _name(model, a))
    pool = getattr(adapted.session_module(0), pool_name)
    seen, inner = [], pool.route   # every path routes the pool with its query first

    def route(q, *a, **k):
        seen.append(q.detach().clone())
        return inner(q, *a, **k)
    pool.route = route
    return seen


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("guide", [True, False])
def test_cross_modal_guide_routes_a_missing_modality_by_the_other(recipe_for, shards, guide):
    """Vision encoder: the visual pool of a sample without image is routed by the text query
    (carried into the image width); text encoder: the textual pool of a sample without text
    by the image query. Without the guide, each pool keeps its own (dummy) query."""
    _, m, model = build(recipe_for, **{"method.cross_modal_guide": guide})
    batch = batch_of(model, m, shards, 0, n=16)
    bb = model.backbone
    q_v0, q_t0 = bb._first_layer_means(batch)
    text_in_image = q_t0 @ bb.text_to_image.t()
    image_in_text = q_v0 @ bb.image_to_text.t()
    assert text_in_image.shape[1] == 32 and image_in_text.shape[1] == 24
    vis_in_vision = _record_pool_queries(model, "visual", "vision")
    txt_in_vision = _record_pool_queries(model, "textual", "vision")
    txt_in_text = _record_pool_queries(model, "textual", "text")
    vis_in_text = _record_pool_queries(model, "visual", "text")
    model.eval()
    with torch.no_grad():
        model.session_forward(batch, 0)
    no_img, no_txt = batch["missing_image"], batch["missing_text"]
    # the other modality's query always comes from outside the encoder
    assert torch.allclose(txt_in_vision[0][~no_txt], text_in_image[~no_txt], atol=1e-5)
    assert torch.allclose(vis_in_text[0][~no_img], image_in_text[~no_img], atol=1e-5)
    if guide:
        assert torch.allclose(vis_in_vision[0][no_img], text_in_image[no_img], atol=1e-5)
        assert torch.allclose(txt_in_text[0][no_txt], image_in_text[no_txt], atol=1e-5)
        assert torch.allclose(txt_in_vision[0][no_txt], vis_in_vision[0][no_txt])
    else:
        assert not torch.allclose(vis_in_vision[0][no_img], text_in_image[no_img], atol=1e-3)
        assert not torch.allclose(txt_in_text[0][no_txt], image_in_text[no_txt], atol=1e-3)


@pytest.mark.parametrize("guide_query", ["layer_matched", "first_layer"])
def test_guide_query_per_layer(recipe_for, shards, guide_query):
    """layer_matched (default): layer l of one encoder is given the other encoder's layer-l
    query from an adapter-free pass; first_layer: every layer gets the layer-0 query."""
    _, m, model = build(recipe_for, **{"backbone.guide_query": guide_query})
    for a in model.adapted:  # adapters that act, so the adapter-free pass really differs
        torch.nn.init.normal_(a.session_module(0).textual.B, std=0.5)
        torch.nn.init.normal_(a.session_module(0).visual.B, std=0.5)
    batch = batch_of(model, m, shards, 0)
    bb = model.backbone
    q_v, q_t = bb._layer_means(batch)
    seen = {l: _record_pool_queries(model, "textual", "vision", l) for l in (0, 1)}
    model.eval()
    with torch.no_grad():
        model.session_forward(batch, 0)
    ok = ~batch["missing_text"]
    for layer in (0, 1):
        expected = q_t[layer if guide_query == "layer_matched" else 0] @ bb.text_to_image.t()
        assert torch.allclose(seen[layer][0][ok], expected[ok], atol=1e-5)
    assert not torch.allclose(q_t[1], q_t[0], atol=1e-3)


def test_training_session_one_leaves_session_zero_bit_identical(recipe_for, shards):
    recipe, m, model = build(recipe_for)
    for a in model.adapted:  # non-zero B everywhere: session 0's adapters really act
        for p in a.session_module(0).parameters():
            torch.nn.init.normal_(p, std=0.1)
    b0, b1 = batch_of(model, m, shards, 0), batch_of(model, m, shards, 1)
    model.eval()
    with torch.no_grad():
        before = model.session_forward(b0, 0)
    engine = TorchEngine(model, model.set_trainable(1), recipe.train, total_steps=4)
    for _ in range(3):
        model.train()
        engine.backward(supervised_loss(engine(b1, session=1)["logits"], b1, model.local_index[1], False))
        engine.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.session_forward(b0, 0), before)


def test_ema_keys_use_joint_space_queries(recipe_for, shards):
    _, m, model = build(recipe_for, **{"task_id.source": "first_layer"})
    batch = batch_of(model, m, shards, 0)
    q, present = model.identifier.query(model.identification_features(batch), batch)
    p = model.backbone.clip.config.projection_dim
    assert q.shape == (8, 2, p) and model.identifier.keys.shape == (3, 2, p)
    assert torch.equal(present[:, 0], ~batch["missing_image"])
    observe_task_id(model, batch, 0)
    assert model.identifier.updates[0].tolist() == [1, 1]
    routed = model.identifier.select(q, present, seen=1)
    assert (routed == 0).all()


def test_analytic_identifier_takes_clip_query_pooled_and_layer_widths(recipe_for, shards):
    """On CLIP the queries live in the joint space (p) and the pooled feature is [image,
    text] embeddings (2p); each encoder's layers add their own modality's token means (image
    width 32, text width 24), read in the pooled pass and equal to its hidden states."""
    _, m, model = build(recipe_for, **{"task_id.source": "analytic"})
    batch = batch_of(model, m, shards, 0)
    feats = model.identification_features(batch)
    clip, p = model.backbone.clip, model.backbone.clip.config.projection_dim
    assert feats["q_v"].shape == (8, p) and feats["pooled"].shape == (8, 2 * p)
    assert model.identifier.layer_modalities == ["image", "image", "text", "text"]
    assert model.identifier.width == 4 * p + 2 * 32 + 2 * 24 + 3
    model.ctx.enabled = False   # the adapter-free pass
    with torch.no_grad():
        hv = clip.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
        ht = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = [hv[1].mean(1), hv[2].mean(1)] + [(h * mask).sum(1) / mask.sum(1) for h in ht[1:]]
    for got, w in zip(feats["layers"], want, strict=True):
        assert torch.allclose(got, w, atol=1e-5)
    model.ctx.enabled = True
    assert model.identifier.route(feats, batch, seen=1).tolist() == [0] * 8


def test_from_pretrained_folder_loads_the_same_clip(recipe_for, shards, tmp_path):
    """No hub here: the real `from_pretrained` path runs on a tiny CLIP saved to disk."""
    from delo_dist.models.clip import ClipBackbone
    recipe = recipe_for(**CLIP)
    tiny = ClipBackbone(recipe.backbone, RoutingContext(enabled=False))
    tiny.clip.save_pretrained(tmp_path / "clip")
    tiny.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = ClipBackbone(recipe_for(**CLIP, **{"backbone.pretrained": str(tmp_path / "clip")}).backbone,
                          RoutingContext(enabled=False))
    m = read_manifest(shards)
    batch = batch_of(type("M", (), {"backbone": tiny})(), m, shards, 0)
    assert torch.allclose(tiny(batch), loaded(batch), atol=1e-6)
    with pytest.raises(ValueError, match="backbone.pretrained"):
        ClipBackbone(recipe_for(**CLIP, **{"backbone.pretrained": str(tmp_path / "none")}).backbone,
                     RoutingContext(enabled=False))


@pytest.mark.slow
def test_quickstart_with_clip_runs_to_metrics_json(shards, tmp_path):
    """`accelerate launch delo_dist/train.py recipes/quickstart.yaml backbone.name=clip`, tiny,
    one epoch, two sessions."""
    out = tmp_path / "delo"
    cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "delo_dist/train.py",
           "recipes/quickstart.yaml", *tiny_overrides(shards, out, **{"data.sessions": 2}),
           "backbone.name=clip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters: delo on clip-tiny (E=4, r=2, factor_rank=4): backbone " in done.stdout
    res = json.loads((out / "metrics.json").read_text())
    assert len(res["accuracy_matrix"]) == 2 and res["method"] == "delo"
    assert res["ap"] == pytest.approx(sum(res["accuracy_matrix"][-1]) / 2)   # AP: the last row
    assert res["sessions"][0]["trainable_params"] > 0


@pytest.mark.slow
def test_quickstart_with_clip_and_mora_runs_to_metrics_json(recipe_for, capsys):
    """The same recipe with method.name=mora, through the trainer in this process; the
    parameter counts are printed at start and logged to MLflow."""
    import mlflow
    from delo_dist.training.trainer import Trainer
    recipe = recipe_for(**{"backbone.name": "clip", "method.name": "mora", "data.sessions": 2})
    assert Trainer(recipe).run() == 0
    assert "parameters: mora on clip-tiny (r=8, alpha=0.1): backbone " in capsys.readouterr().out
    res = json.loads(open(f"{recipe.output_dir}/metrics.json").read())
    assert len(res["accuracy_matrix"]) == 2 and res["method"] == "mora"
    assert res["routing_accuracy"] >= 0.0 and res["sessions"][1]["trainable_params"] > 0
    mlflow.set_tracking_uri(recipe.tracking.uri)
    run = mlflow.search_runs(experiment_names=[recipe.tracking.experiment], output_format="list")[0]
    assert run.data.params["method.name"] == "mora"
    assert int(run.data.params["params.trainable_s0"]) == res["sessions"][0]["trainable_params"]
    assert int(run.data.params["params.adapted_linears"]) > 0
