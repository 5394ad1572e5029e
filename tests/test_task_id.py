"""Task identification plug-ins (delo_dist/models/task_id.py) and the content benchmark, on
tiny random ViLTs and real shards: every source routes each sample without its session id;
`paper` is Eq. 7/8 by hand; `analytic` is a direct ridge solve; state survives a checkpoint;
routing by availability reaches metrics.json."""
from __future__ import annotations

from types import SimpleNamespace

import json
import re

import numpy as np
import pytest
import torch

from tests.helpers import model_for
from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel
from delo_dist.models.inputs import subset
from delo_dist import plugins
from delo_dist.models.task_id import RIDGE_GRID, ridge_features, unpack
from delo_dist.training.objective import observe_task_id

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(recipe_for, source, **extra):
    m, model = model_for(recipe_for(**{"task_id.source": source, **extra}))
    return m, model.eval()


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


@pytest.mark.parametrize("extra", [
    {},                                                                 # the defaults: all layers
    {"task_id.analytic.targets": "class"},
    {"task_id.analytic.max_dims": 100, "task_id.analytic.reduce": "sketch"},             # hashed to 100 dims
])
def test_analytic_equals_a_direct_ridge_solve_with_the_val_chosen_lambda(recipe_for, shards, extra):
    m, model = build(recipe_for, "analytic", **extra)
    ident, rows = model.identifier, len(model.identifier.row_session)
    phi, y, vphi, vy = [], [], [], []
    for k in range(2):
        train, val = batches(model, m, shards, k, "train"), batches(model, m, shards, k, "val")
        seen = []   # the features the fit read (a recomputation may differ in the last bit)

        def features(b):
            seen.append((b, model.identification_features(b)))
            return seen[-1][1]
        info = ident.fit(k, train, val, features)
        assert len(seen) == len(train) + len(val)
        for i, (b, f) in enumerate(seen):
            P, Y = (phi, y) if i < len(train) else (vphi, vy)
            x = ridge_features(f, b, ident.layer_modalities).numpy()
            if ident.sketch_bucket is not None:   # the count sketch by hand: bucket h_i, sign s_i
                hashed = np.zeros((len(x), ident.width - 3))
                pairs = zip(ident.sketch_bucket.tolist(), ident.sketch_sign.tolist())
                for i_raw, (h, sgn) in enumerate(pairs):
                    hashed[:, h] += sgn * x[:, i_raw]
                x = np.concatenate([hashed, x[:, -3:]], 1)
            P.append(x)
            target = np.eye(rows)[b["labels"].numpy() if ident.targets == "class" else np.full(len(x), k)]
            Y.append(target)
    X, Y, XV, YV = map(np.concatenate, (phi, y, vphi, vy))
    cols = ident.row_session.numpy() < 2                                # rows seen so far
    Y, YV = Y[:, cols], YV[:, cols]
    # 3 x 32 + 2 layers x 2 modalities x 32 + 3, or hashed to 100
    assert X.shape[1] == ident.width == (100 if "task_id.analytic.max_dims" in extra else 227)
    scale = np.trace(X.T @ X) / X.shape[1]
    errors = []
    for r in RIDGE_GRID:   # validation squared error of each candidate, from the samples
        W = np.linalg.solve(X.T @ X + r * scale * np.eye(X.shape[1]), X.T @ Y)
        errors.append(((YV - XV @ W) ** 2).sum())
    lam = RIDGE_GRID[int(np.argmin(errors))] * scale
    assert ident.ridge.item() == pytest.approx(lam, rel=1e-9)
    assert info["ridge_lambda"] == pytest.approx(lam, rel=1e-9)
    W = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)
    assert np.allclose(ident.weights[:, cols].numpy(), W, rtol=1e-6, atol=1e-8)
    assert info["ridge_val_error"] == pytest.approx(min(errors), rel=1e-6)
    assert ident.weights[:, ~cols].abs().sum() == 0
    test = mixed_test_batch(model, m, shards)       # route: the seen row of highest score
    best = (ridge_features(model.identification_features(test), test, ident.layer_modalities).numpy()
            if ident.sketch_bucket is None else None)
    if best is not None:
        want = ident.row_session.numpy()[cols][(best @ W).argmax(1)]
        assert model.route(test, seen=2).tolist() == want.tolist()


def test_layer_features_are_the_hidden_states_means_of_the_pooled_pass(recipe_for, shards):
    """Per layer, the image-token and text-token means of ViLT's output_hidden_states[l + 1]
    in the adapter-free pass (missing modalities' dummy tokens included here; the ridge
    zeroes them), read by hooks on the pass that yields the pooled feature: one encoder
    pass per call, not two."""
    m, model = build(recipe_for, "analytic")
    b = batches(model, m, shards, 0, "train")[0]
    vilt = model.backbone.vilt
    passes = []
    hook = vilt.encoder.register_forward_hook(lambda *a: passes.append(1))
    feats = model.identification_features(b)
    hook.remove()
    assert len(passes) == 1 and len(feats["layers"]) == 2 * 2          # 2 layers x 2 modalities
    model.ctx.enabled = False
    with torch.no_grad():
        out = vilt(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   pixel_values=b["pixel_values"], output_hidden_states=True)
    model.ctx.enabled = True
    assert torch.allclose(out.pooler_output, feats["pooled"], atol=1e-6)
    n_text = b["input_ids"].shape[1]
    text = torch.zeros(out.hidden_states[0].shape[:2], dtype=torch.bool)
    text[:, :n_text] = b["attention_mask"].bool()
    image = torch.zeros_like(text)
    image[:, n_text:] = True                                            # every patch (pixel mask 1)
    mean = lambda h, w: (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)   # noqa: E731
    want = [mean(h, w) for h in out.hidden_states[1:] for w in (image, text)]
    for got, w in zip(feats["layers"], want, strict=True):
        assert torch.allclose(got, w, atol=1e-5)
    assert model.identifier.layer_modalities == ["image", "text", "image", "text"]
    # the ridge zeroes a missing modality's blocks and keeps the availability one-hot
    phi = ridge_features(feats, b, model.identifier.layer_modalities)
    d = 32
    no_image = b["missing_image"].nonzero().squeeze(1)
    assert len(no_image) and phi[no_image][:, 3 * d:4 * d].abs().sum() == 0      # layer 0 image
    assert torch.equal(phi[:, -3:].sum(1), torch.ones(len(phi), dtype=phi.dtype))


def test_layer_choice_and_width_cap_from_the_recipe(recipe_for):
    """task_id.analytic.layers picks layers (negative from the end); max_dims drops the earliest
    layers first (reduce=layers) or hashes everything (reduce=sketch); bad values stop."""
    from delo_dist.config import RecipeError
    m = read_manifest(recipe_for().data.shards)
    def ident(**extra):
        r = recipe_for(**{"task_id.source": "analytic", **extra})
        return ContinualModel(r, [s["classes"] for s in m["sessions"]], m["num_classes"]).identifier
    assert [s.index for s in ident(**{"task_id.analytic.layers": "last"}).layers] == [1]
    assert [s.index for s in ident(**{"task_id.analytic.layers": "[0]"}).layers] == [0]
    assert ident(**{"task_id.analytic.layers": "none"}).width == 3 * 32 + 3
    capped = ident(**{"task_id.analytic.max_dims": 3 * 32 + 3 + 64})            # room for one layer: the last
    assert [s.index for s in capped.layers] == [1] and capped.sketch_bucket is None
    hashed = ident(**{"task_id.analytic.max_dims": 64, "task_id.analytic.reduce": "sketch"})
    assert len(hashed.layers) == 2 and hashed.width == 64 and hashed.sketch_bucket.shape == (224,)
    base_too_wide = ident(**{"task_id.analytic.max_dims": 64})                   # even [q_v, q_t, pooled]
    assert base_too_wide.layers == [] and base_too_wide.width == 64
    with pytest.raises(ValueError, match=r"task_id.analytic.layers: layer 5 does not exist"):
        ident(**{"task_id.analytic.layers": "[5]"})
    for bad in ("task_id.analytic.layers=[]", "task_id.analytic.max_dims=8", "task_id.analytic.targets=sample"):
        with pytest.raises(RecipeError, match=bad.split("=")[0]):
            recipe_for(**dict([bad.split("=")]))


def test_sketch_is_fixed_by_its_seed_and_travels_with_the_checkpoint(recipe_for, shards, tmp_path):
    """The count sketch comes from task_id.analytic.projection_seed through a generator of its own:
    the same on every rank (whatever the global RNG did before) and after resume (it is in
    the checkpoint); a 2-rank run's equals the 1-rank run's in tests/test_distributed.py."""
    from delo_dist.training import checkpoint
    extra = {"task_id.analytic.max_dims": 100, "task_id.analytic.reduce": "sketch"}
    torch.manual_seed(123)
    _, a = build(recipe_for, "analytic", **extra)
    torch.rand(7)
    _, b = build(recipe_for, "analytic", **extra)
    m, other = build(recipe_for, "analytic", **extra, **{"task_id.analytic.projection_seed": 1})
    assert torch.equal(a.identifier.sketch_bucket, b.identifier.sketch_bucket)
    assert torch.equal(a.identifier.sketch_sign, b.identifier.sketch_sign)
    assert not torch.equal(a.identifier.sketch_bucket, other.identifier.sketch_bucket)
    assert set(a.identifier.sketch_sign.tolist()) == {-1, 1}
    teach(a, m, shards, sessions=2)
    checkpoint.save(tmp_path, "s", a, None, {"session": 2}, include_backbone=True)
    checkpoint.load_model(tmp_path / "checkpoints" / "s", other)      # its own seed: overwritten
    assert other.identifier.state_sha() == a.identifier.state_sha()
    mixed = mixed_test_batch(a, m, shards)
    assert torch.equal(other.route(mixed, seen=2), a.route(mixed, seen=2))


def test_state_stays_within_150_mb_at_vilt_b32_shape():
    """ViltConfig() is ViLT-B/32's shape (12 layers, width 768). Built on the meta device:
    nothing of the model or the state is allocated. Raw features 20,739 dims (3.4 GB of
    Grams); the defaults keep the last layer's means exactly (D = 3,843), state 119 MB."""
    from transformers import ViltConfig
    from delo_dist.models.backbone import IdentificationLayer
    from delo_dist.models.task_id import AnalyticRouter, AnalyticSettings
    c = ViltConfig()
    d, L = c.hidden_size, c.num_hidden_layers
    sites = [IdentificationLayer(None, "joint", i, L, (("image", d), ("text", d))) for i in range(L)]
    food101 = [list(range(k * 10, min(k * 10 + 10, 101))) for k in range(11)]   # 11 sessions
    shape = SimpleNamespace(query_dim=d, hidden_size=d, identification_layers=lambda: sites)
    with torch.device("meta"):
        build = lambda **kw: AnalyticRouter.build(AnalyticSettings(**kw), food101, 101, shape)  # noqa: E731
        default, hashed = build(), build(reduce="sketch")
        by_class, old = build(targets="class"), build(layers="none")
    assert (d, L) == (768, 12) and default.width == 3 * d + 2 * d + 3 == 3843
    assert [s.index for s in default.layers] == [11] and default.sketch_bucket is None
    assert hashed.raw == 3 * d + L * 2 * d and hashed.width == 4096
    for ident in (default, hashed, by_class):
        assert ident.state_bytes() < 150e6, ident.describe()
    assert default.state_bytes() == pytest.approx(119e6, rel=0.01)
    assert "3,843 dims" in default.describe() and "119." in default.describe()
    assert old.state_bytes() == pytest.approx(2 * 2307 * 2308 / 2 * 8, rel=0.02)   # + sums, weights


def test_checkpoint_from_before_the_layer_features_routes_as_before(recipe_for, shards, tmp_path, capsys):
    """A checkpoint of the analytic router as it was (features [q_v, q_t, pooled], full
    Gram matrices, no `layout`) loads into today's default model, which says so in one line
    and routes exactly as that model did; another layout stops with one line."""
    from safetensors.torch import save_file
    from delo_dist.training import checkpoint
    m, before = build(recipe_for, "analytic", **{"task_id.analytic.layers": "none", "task_id.analytic.max_dims": "null"})
    teach(before, m, shards, sessions=2)
    tensors = checkpoint.model_tensors(before, include_backbone=True)
    D = before.identifier.width
    for n in ("gram", "val_gram"):          # the old format: full (D, D) matrices
        tensors[f"identifier.{n}"] = unpack(tensors[f"identifier.{n}"], D).contiguous()
    del tensors["identifier.layout"]
    old = tmp_path / "old"
    old.mkdir()
    save_file({("task_keys." + n[11:] if n.startswith("identifier.") else n): t
               for n, t in tensors.items()}, str(old / "model.safetensors"))   # its prefix, too
    _, today = build(recipe_for, "analytic")
    assert today.identifier.layers
    checkpoint.load_model(old, today)
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "predates the layer features" in line[0]
    assert today.identifier.layers == [] and today.identifier.width == D
    mixed = mixed_test_batch(before, m, shards)
    assert torch.equal(today.route(mixed, seen=2), before.route(mixed, seen=2))
    _, layered = build(recipe_for, "analytic")
    checkpoint.save(tmp_path, "new", layered, None, {"session": 0}, include_backbone=True)
    _, by_class = build(recipe_for, "analytic", **{"task_id.analytic.targets": "class"})
    with pytest.raises(ValueError, match="another feature layout") as e:
        checkpoint.load_model(tmp_path / "checkpoints" / "new", by_class)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # trains or launches a process: not in the fast loop
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


@pytest.mark.slow
def test_refit_on_a_finished_run_reproduces_its_identification(recipe_for, tmp_path):
    """`identification.refit` evaluates another identifier on a trained run without training
    again: refitting the run's own source (EMA keys, replayed over the training stream)
    gives the run's matrices back; another source keeps the oracle matrix."""
    from pathlib import Path
    from delo_dist.identification import refit
    from delo_dist.training.trainer import Trainer
    recipe = recipe_for(**{"task_id.source": "first_layer", "data.sessions": 2, "train.epochs": 2})
    assert Trainer(recipe).run() == 0
    run = Path(recipe.output_dir)
    res = json.loads((run / "metrics.json").read_text())
    same = refit(run, ["task_id.source=first_layer"], tmp_path / "same")
    assert same["routing_matrix"] == res["routing_matrix"]
    assert same["accuracy_matrix"] == res["accuracy_matrix"] and same["ap"] == res["ap"]
    other = refit(run, ["task_id.source=analytic", "task_id.analytic.targets=class"], tmp_path / "other")
    for a, b in zip(sum(other["oracle_matrix"], []), sum(res["oracle_matrix"], [])):
        assert a == pytest.approx(b, abs=1 / 32 + 1e-9)                # the same trained model
    assert other["state_mb"] > 0 and "class targets" in other["describe"]
    assert len(other["routing_matrix"]) == 2 and 0 <= other["routing"] <= 1


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


def test_identification_table_reports_mean_and_sample_std_over_seeds():
    from delo_dist.identification import table
    rows = [{"benchmark": "content", "identifier": "analytic", "seed": s, "ap": ap, "oracle_ap": 0.5,
             "routing": 0.8, "complete": 1.0, "text_only": None, "image_only": 0.6, "fg": 0.0,
             "fit_s": 2.0, "state_mb": 0.5} for s, ap in ((0, 0.2), (1, 0.4))]
    line = table(rows).splitlines()[2]
    assert line == ("| content | analytic | 2 | 80.0 +/- 0.0 | 100.0 +/- 0.0 | - | 60.0 +/- 0.0 | "
                    "30.0 +/- 14.1 | 50.0 +/- 0.0 | 0.0 +/- 0.0 | 2.0 +/- 0.0 | 0.50 +/- 0.00 |")


# ------------------------------------------------------------------ shared benchmark

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from delo_dist.data.synthetic import make_synthetic
    root = tmp_path_factory.mktemp("shared")
    return make_synthetic(root, sessions=4, classes_per_session=4, train_per_class=24,
                          val_per_class=2, test_per_class=4, image_size=32, samples_per_shard=96,
                          seed=0, progress=False, variant="shared")


def test_shared_benchmark_shares_content_in_session_proportions(shared):
    """Every texture kind and flavour word is used by two sessions (one modality's content
    leaves two candidates), a (kind, flavour) pair by one session; sessions differ in the
    proportions of their dishes and word order; class = (kind j % 2, flavour j // 2)."""
    from collections import Counter
    from delo_dist.data.synthetic import FLAVOURS, TOPICS
    m = read_manifest(shared)
    assert m["source"]["variant"] == "shared" and m["num_classes"] == 16
    names = [n.split("-") for n in m["class_names"]]
    kinds = [{names[4 * s + j][0] for j in range(4)} for s in range(4)]
    flavours = [{names[4 * s + j][1] for j in range(4)} for s in range(4)]
    assert all(len(k) == 2 and len(f) == 2 for k, f in zip(kinds, flavours))
    assert all(v == 2 for v in Counter(x for k in kinds for x in k).values())
    assert all(v == 2 for v in Counter(x for f in flavours for x in f).values())
    assert len({tuple(n) for n in names}) == 16                         # a pair names its session
    for s in range(4):
        first = names[4 * s]
        assert names[4 * s + 1][1] == first[1] and names[4 * s + 2][0] == first[0]
    for s in range(4):
        texts = [r["txt"].decode().split() for r in _samples(shared, m, s)]
        assert {w for t in texts for w in t if w in FLAVOURS} == flavours[s]
        dishes = Counter(w for t in texts for w in t if w in TOPICS)
        favourites = TOPICS[3 * s:3 * s + 3]
        share = sum(dishes[d] for d in favourites) / sum(dishes.values())
        assert share > 0.35                       # 0.3 + 0.7 x 3/12 = 0.475 expected, 0.25 if uniform
        flavour_first = np.mean([min(t.index(f) for f in flavours[s] if f in t) <
                                 min(t.index(d) for d in TOPICS if d in t) for t in texts])
        assert (flavour_first > 0.65) if s < 2 else (flavour_first < 0.35)


