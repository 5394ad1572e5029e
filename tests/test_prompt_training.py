"""The prompt methods as plug-ins, in the real model and trainer, on tiny ViLT and tiny CLIP:
absent prompt rows masked out of attention; RebQ's backbone calls (dummy rows, a prompted
query pass); the shared head (a session's block in training, every seen class at test, the
true session's in the oracle); key-matching and orthogonality losses moving what they should
through the training objective; parameter counts; a recipe asking for a capability the
backbone lacks; each method training two sessions end to end (slow): earlier sessions' parts
bit-identical afterwards, metrics with empty routing where nothing routes, prediction through
`delo_dist.load`; and an exact resume (slow)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

import delo_dist
from delo_dist import metrics as M
from delo_dist import plugins
from delo_dist.config import RecipeError, load_recipe
from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import encode_jpeg, read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel
from delo_dist.models.prompts import Prompts
from delo_dist.models.vilt import ViltBackbone
from delo_dist.training.objective import objective
from delo_dist.training.trainer import EXIT_PREEMPTED, Trainer
from tests.conftest import REPO, tiny_overrides
from tests.test_prompt_hooks import KINDS, backbone, batch_for, rand, run
from tests.helpers import job_env

# settings that fit the tests' 2-layer backbones (the papers' layers go deeper)
SMALL = {"map": {"layers": [0, 1]}, "msp": {"layers": [0, 1]}, "l2p": {},
         "dualprompt": {"g_layers": [0], "e_layers": [1]},
         "coda_prompt": {"pool_size": 4, "layers": [0, 1]},
         "rebq": {"pool_size": 4, "layers": [0, 1], "memory_layers": [0, 1]}}
CLIP = {"backbone.name": "clip", "backbone.tiny.text_hidden_size": 24}


def overrides(method: str, bb: str = "vilt", **extra) -> dict:
    out = {"method.name": method, **{f"method.{method}.{k}": v for k, v in SMALL[method].items()}}
    return {**out, **(CLIP if bb == "clip" else {}), **extra}


def build(recipe_for, method, bb="vilt", **extra):
    """(batch maker, model) as the trainer builds it, every session started."""
    recipe = recipe_for(**overrides(method, bb, **extra))
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(0)
    model = ContinualModel(recipe, [s["classes"] for s in m["sessions"]], m["num_classes"])
    for k in range(len(m["sessions"])):
        model.method.start_session(model, k)

    def batch_of(session, n=8, eta=0.5):
        table = missing_table(m["sessions"][session]["splits"]["train"]["keys"],
                              MissingSpec(eta, "both", 0.5), session, "train")
        return next(iter(SessionStream(recipe.data.shards, m, session, "train", n,
                                       model.backbone.collate, table, train=False)))
    return batch_of, model


# ---- the backbone protocol: masks, dummy rows, a prompted query pass -------------------------

@pytest.mark.parametrize("position", ["input", "prefix"])
@pytest.mark.parametrize("kind,attention", KINDS)
def test_absent_prompt_rows_are_left_out_of_attention(kind, attention, position):
    """A row a mask marks absent changes nothing: the sample's output equals the output with
    that row removed (at two layers, so masks of accumulated input prompts are tracked); the
    other sample, all rows present, equals the unmasked pass."""
    bb = backbone(kind, attention)
    batch = batch_for(bb)
    keep = {0: [True, False, True], 1: [False, True, True]}             # sample 0's rows per layer
    encoders = sorted({s.encoder for s in bb.prompt_sites()})
    widths = {s.encoder: s.width for s in bb.prompt_sites()}
    rows = {(e, l): rand(2, 3, widths[e], seed=10 * l + len(e)) for e in encoders for l in (0, 1)}
    masks = {site: torch.tensor([keep[site[1]], [True] * 3]) for site in rows}

    def prompts(tensors, mask=None):
        if position == "input":
            return Prompts(input=tensors, input_mask=mask or {})
        return Prompts(prefix={s: (t, 2 * t) for s, t in tensors.items()}, prefix_mask=mask or {})
    masked, _ = run(bb, batch, prompts(rows, masks))
    only = {k: v[:1] for k, v in batch.items()}
    kept = {s: t[:1, torch.tensor(keep[s[1]])] for s, t in rows.items()}
    removed, _ = run(bb, only, prompts(kept))
    plain, _ = run(bb, batch, prompts(rows))
    assert torch.allclose(masked[0], removed[0], atol=1e-5)
    assert torch.allclose(masked[1], plain[1], atol=1e-5)
    assert not torch.allclose(masked[0], plain[0], atol=1e-4)          # the masks did act


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_with_dummy_gives_what_collate_gives_a_sample_missing_that_modality(kind):
    from PIL import Image
    bb = backbone(kind)
    jpgs = [encode_jpeg(Image.new("RGB", (32, 32), c)) for c in ((200, 10, 10), (0, 90, 40), (5, 5, 5))]
    samples = [{"key": str(i), "jpg": jpgs[i], "txt": t, "label": i, "session": 0, "status": 0}
               for i, t in enumerate(["spicy soup", "sweet cake with cream", "salad"])]
    batch = bb.collate(samples)
    rows, drop_text = torch.tensor([2, 0, 1]), torch.tensor([True, False, True])
    got = bb.with_dummy(batch, rows, drop_text)
    want = bb.collate([{**samples[r], "status": 1 if t else 2} for r, t in zip(rows.tolist(), drop_text.tolist())])
    for key in ("input_ids", "attention_mask", "pixel_values", "missing_text", "missing_image"):
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(batch["pixel_values"], bb.collate(samples)["pixel_values"])   # untouched


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_prompted_query_is_the_frozen_query_under_prompts_with_gradient(kind):
    bb = backbone(kind)
    batch = batch_for(bb)
    assert set(bb.frozen_query(batch)) == set(bb.frozen_query_dims())
    torch.manual_seed(0)
    frozen = bb.frozen_query(batch)
    torch.manual_seed(0)
    empty = bb.prompted_query(batch, Prompts())
    for name, width in bb.frozen_query_dims().items():
        assert frozen[name].shape == (2, width) and torch.allclose(empty[name], frozen[name], atol=1e-6)
    site = bb.prompt_sites()[0]
    p = rand(2, 3, site.width, grad=True)
    out = bb.prompted_query(batch, Prompts(input={(site.encoder, site.layer): p}))
    sum(v.sum() for v in out.values()).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert bb._capture is None                                            # nothing left behind


# ---- the shared head ------------------------------------------------------------------------

def test_shared_head_trains_a_sessions_block_and_predicts_over_the_seen_classes(recipe_for):
    batch_of, model = build(recipe_for, "map")
    classes = model.session_classes
    batch = batch_of(1)
    out = model(batch, session=1)
    assert out["logits"].shape == (len(batch["keys"]), len(classes[1]))  # session 1's block only
    loss, _ = objective(model, model, batch, 1, 0)
    loss.backward()
    assert all(p.grad is None for p in model.heads[0].parameters())       # other classes: masked
    assert model.heads[1].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.prompter.parameters())

    model.eval()
    with torch.no_grad():                  # one class of session 1 wins every sample once seen
        model.heads[1].bias[2] = 1e4
    old = batch_of(0)
    first = model.predict(old, seen=1)
    assert set(first["pred"].tolist()) <= set(classes[0]) and first["routed"] is None
    both = model.predict(old, seen=2)
    assert both["pred"].tolist() == [classes[1][2]] * len(old["keys"])
    assert torch.equal(both["classes"][both["logits"].argmax(-1)], both["pred"])
    assert set(both["oracle_pred"].tolist()) <= set(classes[0])             # the true session's
    assert torch.equal(both["oracle_pred"], first["pred"])


@pytest.mark.parametrize("method,term,tensors", [
    ("l2p", "l2p_key", ["pool.keys"]),
    ("dualprompt", "dualprompt_key", ["e_keys.0"]),
    ("msp", "msp_ortho", ["image.joint_0", "image.joint_1"]),
    ("coda_prompt", "coda_ortho", ["pools.joint_0.K.0", "pools.joint_1.K.0"]),
])
def test_key_and_orthogonality_losses_move_their_tensors_through_the_objective(
        recipe_for, method, term, tensors):
    """The term is part of the trained loss and falls over a few steps of the real objective
    (key-matching: the keys get the term's gradient and nothing else, the choice being hard)."""
    batch_of, model = build(recipe_for, method)
    params = dict(model.prompter.named_parameters())
    with torch.no_grad():   # start far from orthogonal: the image prompts near the text ones
        if method == "msp":
            for name in model.prompter.text:
                model.prompter.image[name].copy_(model.prompter.text[name] + 0.01)
        if method == "coda_prompt":
            for t in tensors:
                params[t].add_(1.0)
    trainable = model.set_trainable(0)
    opt = torch.optim.Adam(trainable.values(), lr=0.05)
    batch = batch_of(0)
    before = {t: params[t].detach().clone() for t in tensors}
    seen = []
    for _ in range(15):
        opt.zero_grad()
        torch.manual_seed(0)
        loss, parts = objective(model, model, batch, 0, 0)
        seen.append(parts[term])
        loss.backward()
        if method in ("l2p", "dualprompt") and len(seen) == 1:   # the keys see the term alone
            weight, value = model.method.loss_terms(model, batch, model(batch, session=0), 0)[term]
            key = params[tensors[0]]
            alone = torch.autograd.grad(weight * value, key)[0]
            assert torch.allclose(key.grad, alone, atol=1e-7)
        opt.step()
    assert seen[-1] < 0.5 * seen[0], seen
    assert all(not torch.equal(params[t], before[t]) for t in tensors)


@pytest.mark.parametrize("method", list(SMALL))
def test_parameter_counts_and_what_each_session_trains(recipe_for, method):
    """Per-session parts are separate tensors: session 1 trains its own and what the method
    shares, never session 0's; counts go through session_parameters (shared parts count in
    every session they train in, once in the total)."""
    _, model = build(recipe_for, method)
    s0, s1 = (set(model.session_parameters(k)) for k in (0, 1))
    shared = s0 & s1
    assert all(n.startswith("prompter.") for n in shared)
    assert bool(shared) == (method in ("map", "msp", "l2p", "dualprompt"))
    if method in ("map", "msp", "l2p"):                                  # not continual: all shared
        assert shared == {n for n, _ in model.prompter.named_parameters(prefix="prompter")}
    counts = model.parameter_counts()
    own = dict(model.named_parameters())
    for k, names in enumerate((s0, s1)):
        assert counts["sessions"][k]["trainable"] == sum(own[n].numel() for n in names)
        assert counts["sessions"][k]["head"] == sum(p.numel() for p in model.heads[k].parameters())
    prompts = sum(p.numel() for p in model.prompter.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    assert counts["total"] == counts["backbone_frozen"] + prompts + heads
    trainable = model.set_trainable(1)
    assert set(trainable) == s1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == s1


def test_layers_the_backbone_lacks_name_the_recipe_key(recipe_for):
    with pytest.raises(ValueError, match=r"key 'method\.map\.layers': layers \[2, 3, 4, 5\]"):
        build(recipe_for, "map", **{"method.map.layers": [0, 1, 2, 3, 4, 5]})


class NoPrefixVilt(ViltBackbone):
    """ViLT declaring no attention-prefix hook (a backbone without the capability)."""
    name = "vilt_no_prefix"
    capabilities = ViltBackbone.capabilities - {"prompt_prefix"}


def test_a_method_needing_a_capability_the_backbone_lacks_stops_at_the_recipe(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(plugins._registered["backbone"], NoPrefixVilt.name, NoPrefixVilt)
    def load(**extra):
        return load_recipe(REPO / "recipes" / "quickstart.yaml", tiny_overrides(
            shards, tmp_path / "run", **{"backbone.name": NoPrefixVilt.name, **extra}))
    with pytest.raises(RecipeError) as e:
        load(**{"method.name": "dualprompt"})
    msg = str(e.value)
    assert "\n" not in msg and "'dualprompt'" in msg and f"'{NoPrefixVilt.name}'" in msg
    assert "capability 'prompt_prefix'" in msg and "attention prefixes" in msg
    with pytest.raises(RecipeError, match="'rebq' needs the backbone capability 'prompt_prefix'"):
        load(**{"method.name": "rebq"})
    # needs follow the settings: the same methods with input prompts only are fine
    assert load(**{"method.name": "dualprompt", "method.dualprompt.position": "input"})
    assert load(**{"method.name": "rebq", "method.rebq.position": "input"})
    assert load(**{"method.name": "map"}).method.name == "map"


# ---- end to end ------------------------------------------------------------------------------

CASES = [(m, bb, {}) for m in SMALL for bb in ("vilt", "clip")] + [
    ("dualprompt", "vilt", {"method.dualprompt.routing": "task_id"})]


@pytest.mark.slow
@pytest.mark.parametrize("method,bb,extra", CASES,
                         ids=[f"{m}-{bb}" + ("-task_id" if e else "") for m, bb, e in CASES])
def test_trains_two_sessions_evaluates_and_predicts(recipe_for, method, bb, extra):
    recipe = recipe_for(**overrides(method, bb, **{"data.sessions": 2, **extra}))
    assert Trainer(recipe).run() == 0
    out = Path(recipe.output_dir)
    res = json.loads((out / "metrics.json").read_text())
    matrix = res["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2] and [len(r) for r in res["oracle_matrix"]] == [1, 2]
    assert res["fg"] == pytest.approx(M.forgetting(matrix)) and res["ap"] == pytest.approx(sum(matrix[1]) / 2)
    routes = method == "dualprompt"                   # its E-prompt choice is a routing
    if routes:
        assert all(isinstance(v, float) for row in res["routing_matrix"] for v in row)
        assert res["task_id_source"] == ("analytic" if extra else None)
    else:
        assert res["routing_matrix"] == [[None], [None, None]] and res["routing_accuracy"] is None
        assert res["routing_by_availability"]["count"] == {"complete": 0, "text_only": 0, "image_only": 0}

    # what trained: session 1's parts moved, session 0's (its head included) bit-identical
    torch.manual_seed(0)
    m = read_manifest(recipe.data.shards)
    model = ContinualModel(recipe, [s["classes"] for s in m["sessions"][:2]], m["num_classes"])
    s0, s1 = (model.session_parameters(k) for k in (0, 1))
    a = load_file(str(out / "checkpoints" / "session_00" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "session_01" / "model.safetensors"))
    assert {n for n, _ in model.named_parameters() if n.startswith("prompter.")} <= set(a)
    untouched = set(s0) - set(s1)
    assert "heads.0.weight" in untouched
    assert all(torch.equal(a[n], b[n]) for n in untouched)
    assert all(not torch.equal(a[n], b[n]) for n in s1), [n for n in s1 if torch.equal(a[n], b[n])]
    per = [sum(p.numel() for p in s.values()) for s in (s0, s1)]
    assert [s["trainable_params"] for s in res["sessions"]] == per   # what the optimizer held
    mlflow.set_tracking_uri(recipe.tracking.uri)
    run, = mlflow.search_runs(experiment_names=[recipe.tracking.experiment], output_format="list")
    assert [int(run.data.params[f"params.trainable_s{k}"]) for k in (0, 1)] == per

    # prediction through delo_dist.load: the shared head's classes and probabilities
    loaded = delo_dist.load(out)
    seen = set(m["sessions"][0]["classes"]) | set(m["sessions"][1]["classes"])
    for r in loaded.predict(texts=["a spicy soup", "sweet cake with cream"]):
        assert r["class_ids"][0] in seen and 0 < r["scores"][0] <= 1
        assert (r["session"] in (0, 1)) if routes else r["session"] is None
        assert (r["session_confidence"] is not None) == bool(extra)
    oracle, = loaded.predict(texts=["sweet cake"], mode="oracle", session=1)
    assert oracle["session"] == 1 and oracle["class_ids"][0] in m["sessions"][1]["classes"]


def _command(overrides):
    import sys
    return [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml", *overrides]


@pytest.mark.slow
def test_coda_prompt_resumes_exactly_mid_session_and_at_a_session_start(shards, tmp_path):
    """SIGTERM in session 1 -> checkpoint, exit 75; the relaunch ends with the metrics of a run
    never interrupted. Relaunching from the end of session 0 (start_session draws session 1's
    slice from the restored RNG) gives them too."""
    extra = {"data.sessions": 2, "train.epochs": 4, "tracking.experiment": "resume-coda",
             **overrides("coda_prompt")}
    straight = tmp_path / "straight"
    done = subprocess.run(_command(tiny_overrides(shards, straight, **extra)), cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want = json.loads((straight / "metrics.json").read_text())

    out = tmp_path / "killed"
    args = _command(tiny_overrides(shards, out, **extra))
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / "session_00" / "state.json"
    deadline = time.time() + 300
    while not marker.exists():        # session 0 finished: session 1 is training now
        assert proc.poll() is None and time.time() < deadline, "run ended before session 1"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert json.loads((out / "checkpoints" / "latest_step" / "state.json").read_text())["mid_session"]

    boundary = tmp_path / "boundary"  # the straight run as it stood after session 0
    shutil.copytree(straight, boundary)
    for name in ("metrics.json", "mlflow_run_id"):
        (boundary / name).unlink(missing_ok=True)
    shutil.rmtree(boundary / "checkpoints" / "session_01")
    (boundary / "checkpoints" / "latest").write_text("session_00")

    again = subprocess.run(args, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", tiny_overrides(shards, boundary, **extra))
    assert Trainer(recipe).run() == 0                 # in this process: one start less
    for folder in (out, boundary):
        got = json.loads((folder / "metrics.json").read_text())
        for key in ("accuracy_matrix", "oracle_matrix", "ap", "fg", "oracle_ap"):
            assert got[key] == want[key], (folder.name, key)
        assert [s["train_loss"] for s in got["sessions"]] == [s["train_loss"] for s in want["sessions"]]
