"""Task identification plug-ins (delo_dist/models/task_id.py) and the content benchmark, on
tiny random ViLTs and real shards: every source routes each sample without its session id;
`paper` is Eq. 7/8 by hand; `analytic` is a direct ridge solve; state survives a checkpoint;
routing by availability reaches metrics.json."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel
from delo_dist.models.inputs import subset
from delo_dist import plugins
from delo_dist.models.task_id import RIDGE_GRID, ridge_features
from delo_dist.training.objective import observe_task_id

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(recipe_for, source):
    recipe = recipe_for(**{"task_id.source": source})
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(0)
    model = ContinualModel(recipe, [s["classes"] for s in m["sessions"]], m["num_classes"]).eval()
    return m, model


def batches(model, m, shards, k, split, n=16, eta=0.5):
    table = missing_table(m["sessions"][k]["splits"][split]["keys"], MissingSpec(eta, "both", 0.5),
                          k, split)
    return list(SessionStream(shards, m, k, split, n, model.backbone.collate, table, train=False))


def teach(model, m, shards, sessions=3):
    """What the trainer does: per-step observation, then the end-of-session fit."""
    for k in range(sessions):
        train = batches(model, m, shards, k, "train")
        for b in train:
            observe_task_id(model, b, k)
        model.identifier.fit(k, train, batches(model, m, shards, k, "val"),
                            model.identification_features)


def mixed_test_batch(model, m, shards, n=8):
    parts = [batches(model, m, shards, k, "test", n=n)[0] for k in range(3)]
    return {key: (torch.cat([p[key] for p in parts]) if torch.is_tensor(parts[0][key])
                  else sum((p[key] for p in parts), [])) for key in parts[0]}


@pytest.mark.parametrize("source", plugins.names("task_id"))
def test_every_source_routes_each_sample_without_its_session_id(recipe_for, shards, source):
    m, model = build(recipe_for, source)
    teach(model, m, shards)
    mixed = mixed_test_batch(model, m, shards)
    routed = model.route(mixed, seen=3)
    blind = dict(mixed, session=torch.zeros_like(mixed["session"]), labels=torch.zeros_like(mixed["labels"]))
    assert torch.equal(model.route(blind, seen=3), routed)              # never reads the id
    for i in range(0, 24, 5):                                          # per sample, no batch vote
        assert model.route(subset(mixed, torch.tensor([i])), seen=3).item() == routed[i].item()
    assert ((routed >= 0) & (routed < 3)).all()
    assert (model.route(mixed, seen=2) < 2).all()                       # unseen sessions never chosen
    # the cue benchmark's sessions carry a session-level cue: every source beats chance (1/3)
    assert (routed == mixed["session"]).float().mean() > 0.5


def test_paper_keys_are_equation_7_and_8_by_hand(recipe_for, shards):
    m, model = build(recipe_for, "paper")
    beta = model.identifier.momentum
    vilt = model.backbone.vilt
    hand = torch.zeros(3, vilt.config.hidden_size)

    def whole_sequence_query(b):   # first layer's normalised input, mean over all real tokens
        pix = torch.ones_like(b["pixel_values"][:, 0], dtype=torch.long)
        emb, mask = vilt.embeddings(b["input_ids"], b["attention_mask"], None, b["pixel_values"],
                                    pix, None, None, image_token_type_idx=1)
        h = vilt.encoder.layer[0].layernorm_before(emb)
        w = mask.float().unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)

    with torch.no_grad():
        for k in range(3):
            for b in batches(model, m, shards, k, "train")[:3]:
                observe_task_id(model, b, k)
                hand[k] = beta * hand[k] + (1 - beta) * whole_sequence_query(b).mean(0)
        assert torch.allclose(model.identifier.keys[:, 0], hand, atol=1e-6)
        mixed = mixed_test_batch(model, m, shards)
        q = whole_sequence_query(mixed)
        want = torch.nn.functional.cosine_similarity(q[:, None], hand[None], dim=-1).argmax(1)
    assert torch.equal(model.route(mixed, seen=3), want)


def test_class_prototypes_are_per_class_modality_means(recipe_for, shards):
    m, model = build(recipe_for, "class_prototypes")
    train = batches(model, m, shards, 1, "train")
    model.identifier.fit(1, train, [], model.identification_features)
    c = m["sessions"][1]["classes"][2]
    q_t = torch.cat([model.identification_features(b)["q_t"][(b["labels"] == c) & ~b["missing_text"]]
                     for b in train])
    proto = model.identifier.sums[c, 1] / model.identifier.counts[c, 1]
    assert model.identifier.counts[c, 1] == len(q_t) > 0
    assert torch.allclose(proto, q_t.double().mean(0), atol=1e-6)
    assert model.identifier.counts[m["sessions"][0]["classes"]].sum() == 0   # other sessions untouched
    # a text-only sample is compared with the textual prototypes only
    lone = subset(train[0], torch.tensor([0]))
    lone = dict(lone, missing_image=torch.tensor([True]), missing_text=torch.tensor([False]),
                pixel_values=torch.ones_like(lone["pixel_values"]))
    assert model.route(lone, seen=2).item() == 1                       # only session 1 has prototypes


def test_analytic_equals_a_direct_ridge_solve_with_the_val_chosen_lambda(recipe_for, shards):
    m, model = build(recipe_for, "analytic")
    phi, y, vphi, vy = [], [], [], []
    for k in range(2):
        train, val = batches(model, m, shards, k, "train"), batches(model, m, shards, k, "val")
        seen = []   # the features the fit read (a recomputation may differ in the last bit)

        def features(b):
            seen.append((b, model.identification_features(b)))
            return seen[-1][1]
        info = model.identifier.fit(k, train, val, features)
        assert len(seen) == len(train) + len(val)
        for i, (b, f) in enumerate(seen):
            P, Y = (phi, y) if i < len(train) else (vphi, vy)
            P.append(ridge_features(f, b).numpy())
            Y.append(np.eye(2)[np.full(len(b["keys"]), k)])
    X, Y, XV, YV = map(np.concatenate, (phi, y, vphi, vy))
    scale = np.trace(X.T @ X) / X.shape[1]
    errors = []
    for r in RIDGE_GRID:   # validation squared error of each candidate, from the samples
        W = np.linalg.solve(X.T @ X + r * scale * np.eye(X.shape[1]), X.T @ Y)
        errors.append(((YV - XV @ W) ** 2).sum())
    lam = RIDGE_GRID[int(np.argmin(errors))] * scale
    assert model.identifier.ridge.item() == pytest.approx(lam, rel=1e-9)
    assert info["ridge_lambda"] == pytest.approx(lam, rel=1e-9)
    W = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)
    assert np.allclose(model.identifier.weights[:, :2].numpy(), W, rtol=1e-6, atol=1e-8)
    assert info["ridge_val_error"] == pytest.approx(min(errors), rel=1e-6)
    assert model.identifier.weights[:, 2:].abs().sum() == 0


def test_identifier_state_checkpointed_and_routing_by_availability_reported(recipe_for, capsys):
    from delo_dist.training import checkpoint
    from delo_dist.training.trainer import Trainer
    recipe = recipe_for(**{"task_id.source": "analytic", "data.sessions": 2})
    assert Trainer(recipe).run() == 0
    res = json.loads(open(recipe.output_dir + "/metrics.json").read())
    assert res["task_id_source"] == "analytic"
    by = res["routing_by_availability"]
    assert set(by["overall"]) == {"complete", "text_only", "image_only"}
    # eta 0.7, both: 30 % complete, 35 % text-only, 35 % image-only of 2 x 32 test samples
    assert by["count"] == {"complete": 20, "text_only": 22, "image_only": 22}
    routing = res["routing_accuracy"]
    pooled = sum(by["overall"][n] * c for n, c in by["count"].items()) / 64
    assert pooled == pytest.approx(routing)                            # 32 samples per session
    assert len(by["per_session"]) == 2 and all(s["task_id_fit_s"] > 0 for s in res["sessions"])
    assert res["sessions"][1]["ridge_lambda"] > 0
    assert re.search(r"routing [\d.]+% \(complete [\d.]+, text-only [\d.]+, image-only [\d.]+\)",
                     capsys.readouterr().out)
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(1)
    fresh = ContinualModel(recipe, [s["classes"] for s in m["sessions"][:2]], m["num_classes"])
    ckpt = checkpoint.latest(recipe.output_dir)
    assert fresh.identifier.state_sha() != res["sessions"][1]["per_rank"][0]["task_id_sha"]
    checkpoint.load_model(ckpt, fresh)
    assert fresh.identifier.state_sha() == res["sessions"][1]["per_rank"][0]["task_id_sha"]
    from safetensors.torch import load_file   # session 1 leaves session 0's statistics alone
    after0, after1 = (load_file(str(ckpt.parent / t / "model.safetensors")) for t in ("session_00", "session_01"))
    for n in ("identifier.sums", "identifier.val_sums", "identifier.val_counts"):
        assert torch.equal(after0[n][0], after1[n][0]) and not torch.equal(after0[n][1], after1[n][1])


# ------------------------------------------------------------------ content benchmark

@pytest.fixture(scope="module")
def content(tmp_path_factory):
    from delo_dist.data.synthetic import make_synthetic
    root = tmp_path_factory.mktemp("content")
    return make_synthetic(root, sessions=3, classes_per_session=4, train_per_class=12,
                          val_per_class=2, test_per_class=4, image_size=32, samples_per_shard=48,
                          seed=0, progress=False, variant="content")


def _samples(root, m, k):
    from delo_dist.data.shards import iter_tar_samples
    urls = [str(root / s) for s in m["sessions"][k]["splits"]["train"]["shards"]]
    return list(iter_tar_samples(urls, {"skipped": 0}))


def test_content_benchmark_has_no_session_level_cue(content):
    import io
    from PIL import Image
    from delo_dist.data.synthetic import FILLERS, FLAVOURS, TOPICS
    m = read_manifest(content)
    assert m["source"]["variant"] == "content" and m["num_classes"] == 12
    colours, vocab = [], []
    for k in range(3):
        raws = _samples(content, m, k)
        imgs = np.stack([np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("RGB"), np.float64)
                         for r in raws])
        colours.append(imgs.mean((1, 2)))                               # (n, 3) per image
        vocab.append({w for r in raws for w in r["txt"].decode().split()})
    means = np.array([c.mean(0) for c in colours])                      # (3 sessions, RGB)
    sem = max(c.std(0).max() / np.sqrt(len(c)) for c in colours)
    assert np.abs(means - means.mean(0)).max() < 4 * sem                # equal within noise
    content_words = [v & set(FLAVOURS) for v in vocab]
    assert all(len(w) == 2 for w in content_words)                     # 2 flavours a session
    assert not (content_words[0] & content_words[1]) and not (content_words[1] & content_words[2])
    assert all(v - set(FLAVOURS) <= set(TOPICS) | set(FILLERS) for v in vocab)
    dishes = [v & set(TOPICS) for v in vocab]          # the cue variant: one dish a session
    assert all(len(d) >= 6 for d in dishes) and len(dishes[0] & dishes[1] & dishes[2]) >= 3


def test_content_classes_need_both_modalities(content):
    """Class j = (pattern j % 2, flavour j // 2): a pattern names two classes, a flavour two."""
    m = read_manifest(content)
    names = m["class_names"][:4]
    patterns, flavours = [n.rsplit("-", 1)[0] for n in names], [n.rsplit("-", 1)[1] for n in names]
    assert patterns[0] == patterns[2] != patterns[1] and flavours[0] == flavours[1] != flavours[2]
    later = {n.rsplit("-", 1)[0] for n in m["class_names"][4:]}
    assert not later & set(patterns)                                   # sessions differ by content
