"""The paper's protocol (issue 10): long texts through an enlarged text position table,
the reference's list-text join, the multi-label metric over seen or session classes,
global batch and gradient accumulation, and the trainable counts of the paper's Table 5."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import ViltConfig, ViltModel

from delo_dist.config import BackboneConfig
from delo_dist.models.adapters import RoutingContext
from delo_dist.models.vilt import ViltBackbone, ViltSettings, extend_text_positions, offline_tokenizer

TINY_VILT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=16, image_size=32, max_position_embeddings=40, max_image_length=-1)


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pretrained_40(tmp_path_factory):
    """A save_pretrained folder with a 40-row text position table, as dandelin/vilt-b32-mlm."""
    folder = tmp_path_factory.mktemp("vilt40")
    tok = offline_tokenizer()
    torch.manual_seed(0)
    model = ViltModel(ViltConfig(**TINY_VILT, vocab_size=len(tok)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.embeddings.text_embeddings.position_embeddings.weight.detach().clone()


@pytest.mark.parametrize("rule", ["resample", "extend"])
def test_pretrained_40_positions_loads_at_512(pretrained_40, rule):
    folder, table40 = pretrained_40
    cfg = BackboneConfig(pretrained=str(folder), image_size=32, max_text_len=512,
                         settings=ViltSettings(text_position_rule=rule))
    bb = ViltBackbone(cfg, RoutingContext())
    emb = bb.vilt.embeddings.text_embeddings
    table = emb.position_embeddings.weight
    assert table.shape == (512, 32) and emb.position_ids.shape == (1, 512)
    assert emb.token_type_ids.shape == (1, 512) and bb.vilt.config.max_position_embeddings == 512
    assert not table.requires_grad
    # the reference's upsampling: a (1, 1, 40, d) image resized to (512, d), bilinear
    reference = torch.nn.functional.interpolate(table40.view(1, 1, 40, 32), size=(512, 32),
                                                mode="bilinear").squeeze()
    if rule == "resample":
        assert torch.allclose(table, reference, atol=1e-6)
        assert not torch.allclose(table[:40], table40)           # every row moves
    else:
        assert torch.equal(table[:40], table40)                  # pretrained rows kept
        assert torch.allclose(table[40:], reference[40:], atol=1e-6)
    long_text = " ".join(["red circle"] * 400)                   # ~800 tokens: cut at 512
    batch = bb.collate([{"key": f"k{i}", "jpg": _jpeg(), "txt": long_text, "label": 0,
                         "session": 0, "status": s} for i, s in enumerate((0, 1, 2))])
    assert batch["input_ids"].shape == (3, 512) and int(batch["attention_mask"][0].sum()) == 512
    pooled = bb(batch)
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()
    assert int(bb.ctx.text_tokens[0].sum()) == 512 and int(bb.ctx.image_tokens[0].sum()) == 5


def test_tiny_backbone_grows_its_table_too():
    cfg = BackboneConfig(image_size=32, max_text_len=100, tiny={**BackboneConfig().tiny,
                                                                "max_position_embeddings": 40})
    bb = ViltBackbone(cfg, RoutingContext())
    assert bb.vilt.embeddings.text_embeddings.position_embeddings.weight.shape[0] == 100
    vilt = bb.vilt
    extend_text_positions(vilt, 60)                              # shorter: left alone
    assert vilt.config.max_position_embeddings == 100


# ----------------------------------------------------------------------------- multi-label metric
def _scorer(mode: str):
    from delo_dist.training.evaluation import Scoring, score
    scoring = Scoring(multilabel=True, num_classes=4, session_classes=((0, 1), (2, 3)),
                      multilabel_classes=mode)
    return lambda rows, session, seen: score(rows, session, seen, scoring)


def test_macro_f1_over_seen_or_session_classes():
    # session 0's test set after 2 sessions: (key, labels, pred, oracle pred, routed session)
    rows = [("a", [0, 2], [0], [0], 0), ("b", [1], [1, 2], [1], 1), ("c", [0], [], [], 0)]
    # class 0: tp 1 fn 1 -> 2/3; class 1: tp 1 -> 1; class 2: fp 1 fn 1 -> 0; class 3: empty -> 0
    perf, oracle, routing = _scorer("session")(rows, 0, 2)
    assert perf == pytest.approx((2 / 3 + 1) / 2) and oracle == pytest.approx((2 / 3 + 1) / 2)
    assert routing == pytest.approx(2 / 3)
    perf, oracle, _ = _scorer("seen")(rows, 0, 2)
    assert perf == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    assert oracle == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)  # oracle: class 2 missed (fn)
    assert _scorer("seen")(rows, 0, 1)[0] == pytest.approx(5 / 6)  # only session 0 seen


@pytest.mark.slow  # two tiny training runs (~15 s with the first import)
def test_multilabel_classes_in_metrics_and_mlflow(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from delo_dist.data.prepare import prepare
    from tests.test_prepare import make_cmml, train_one_session
    root = make_cmml(tmp_path / "raw", label=lambda c: [int(j in (c, (c + 1) % 4)) for j in range(4)])
    prepare("cmml-json", root, tmp_path / "shards", image_size=32, progress=False)
    res = {}
    for mode in ("seen", "session"):
        res[mode] = train_one_session(tmp_path / "shards", tmp_path / mode, "cmml-json", **{
            "data.sessions": 2, "eval.multilabel_classes": mode, "tracking.experiment": "ml"})
        assert res[mode]["metric"] == "macro_f1" and res[mode]["multilabel_classes"] == mode
    # after session 0 only its classes are seen: both modes score the same cell
    assert res["seen"]["accuracy_matrix"][0] == res["session"]["accuracy_matrix"][0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ml").experiment_id
    assert sorted(r.data.tags["metric"] for r in client.search_runs([exp])) == [
        "macro_f1/seen", "macro_f1/session"]
    assert json.loads((tmp_path / "seen" / "metrics.json").read_text())["multilabel_classes"] == "seen"


# ----------------------------------------------------------------------------- global batch
@pytest.mark.parametrize("global_batch, cap, world, plan", [
    (None, 16, 3, (16, 1)), (4, 4, 1, (4, 1)), (4, 1, 1, (1, 4)), (4, 16, 2, (2, 1)),
    (4, 4, 4, (1, 1)), (32, 4, 2, (4, 4)), (12, 4, 1, (4, 3)),
])
def test_batch_plan(global_batch, cap, world, plan):
    from delo_dist.config import TrainConfig, batch_plan
    assert batch_plan(TrainConfig(batch_size=cap, global_batch_size=global_batch), world) == plan


@pytest.mark.parametrize("global_batch, cap, world, message", [
    (4, 4, 8, r"global_batch_size=4 does not split over 8 devices"),
    (6, 4, 1, r"global_batch_size=6 on 1 devices gives 6 samples per device, which micro-batches "
              r"of train.batch_size=4 do not divide"),
])
def test_impossible_split_names_the_numbers(global_batch, cap, world, message):
    from delo_dist.config import RecipeError, TrainConfig, batch_plan
    with pytest.raises(RecipeError, match=message):
        batch_plan(TrainConfig(batch_size=cap, global_batch_size=global_batch), world)


def test_stream_one_device_accumulating_equals_four_devices(shards):
    """Per optimizer step, 1 device x accum 4 reads the samples 4 devices x accum 1 read,
    and every micro-batch knows the step's complete count."""
    from delo_dist.data.shards import read_manifest
    from delo_dist.data.stream import SessionStream, make_loader
    m = read_manifest(shards)
    keys = m["sessions"][0]["splits"]["train"]["keys"]
    status = {k: i % 3 for i, k in enumerate(keys)}        # a third complete

    def collate(samples):
        return {"keys": [s["key"] for s in samples], "status": [s["status"] for s in samples]}

    def run(world, rank, accum, workers=0):
        s = SessionStream(shards, m, 0, "train", 2, collate, status, train=True, rank=rank,
                          world=world, seed=3, accum=accum)
        batches = list(make_loader(s, workers))
        assert len(batches) == len(s)
        return batches

    one = run(1, 0, 4)
    assert [b["keys"] for b in one] == [b["keys"] for b in run(1, 0, 4, workers=2)]  # order kept
    four = [run(4, r, 1) for r in range(4)]
    assert len(one) == 4 * len(four[0]) == 4 * (64 // 8)
    for step in range(len(four[0])):
        mine = [k for b in one[4 * step:4 * step + 4] for k in b["keys"]]
        theirs = [k for r in range(4) for k in four[r][step]["keys"]]
        assert mine == theirs
        complete = sum(st == 0 for b in one[4 * step:4 * step + 4] for st in b["status"])
        assert {float(b["complete_per_micro"][0]) for b in one[4 * step:4 * step + 4]} == {complete / 4}
        assert float(four[0][step]["complete_per_micro"][0]) == complete


@pytest.mark.slow  # two tiny training runs
def test_accumulation_trains_like_the_doubled_batch(shards, tmp_path):
    """TorchEngine, 1 process: micro-batch 4 x accumulation 2 and batch 8 take the same
    optimizer steps (losses, task keys and scores within float tolerance)."""
    import json

    from mlflow.tracking import MlflowClient

    from delo_dist.config import load_recipe
    from delo_dist.training.trainer import Trainer
    from tests.conftest import REPO, tiny_overrides
    runs = {}
    for name, extra in {"accum": {"train.batch_size": 4, "train.global_batch_size": 8},
                        "plain": {"train.batch_size": 8}}.items():
        out = tmp_path / name
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", tiny_overrides(shards, out, **{
            "data.sessions": 2, "train.log_every": 1, "tracking.run_name": name,
            "tracking.experiment": "accum",
            "data.eta": 0.7, "train.grad_clip": 0.0,
            "task_id.source": "first_layer",   # EMA keys: one update per optimizer step
            **extra}))
        trainer = Trainer(recipe)
        assert trainer.run() == 0
        runs[name] = (json.loads((out / "metrics.json").read_text()), trainer)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {}
    for r in client.search_runs([client.get_experiment_by_name("accum").experiment_id]):
        history[r.info.run_name] = [m.value for m in sorted(
            client.get_metric_history(r.info.run_id, "step/loss"), key=lambda m: m.step)]
    assert len(history["accum"]) == len(history["plain"]) == 2 * 64 // 8
    assert history["accum"] == pytest.approx(history["plain"], rel=1e-4, abs=1e-6)
    (a, ta), (p, tp) = runs["accum"], runs["plain"]
    assert sum(a["accuracy_matrix"], []) == pytest.approx(sum(p["accuracy_matrix"], []),
                                                          abs=1 / 32 + 1e-9)  # <= 1 sample moved
    assert torch.allclose(ta.model.identifier.keys, tp.model.identifier.keys, atol=1e-5)
    assert [s["train_loss"] for s in a["sessions"]] == pytest.approx(
        [s["train_loss"] for s in p["sessions"]], rel=1e-4)


# ----------------------------------------------------------------------------- Table 5
VILT_B32 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,  # ViltConfig()
                intermediate_size=3072, patch_size=32, initializer_range=0.02)
TABLE5 = {(16, 2): (7.1, 182.8), (16, 4): (12.4, 235.9), (16, 8): (23.0, 342.1),
          (32, 2): (14.2, 253.6), (32, 4): (24.8, 359.8), (32, 8): (46.0, 572.1)}


def test_table5_trainable_and_total_parameters():
    """DeLo on ViLT-B/32 (shapes only: the meta device allocates nothing), a session of
    UPMC-Food101's 10 classes, factor_rank = r: the per-session trainable counts of Table 5
    (adapters + head), and its totals as the frozen ViLT-B/32 (30522-word vocabulary, text
    table grown to 512 rows as for Food101, pooler) + 10 sessions x trainable. (One session
    is built: sessions are identical, and 10 would take 5 s a model even on meta.)"""
    from delo_dist.config import load_recipe
    from delo_dist.models.continual import ContinualModel
    with torch.device("meta"):
        vilt = ViltModel(ViltConfig())
        extend_text_positions(vilt, 512)
    backbone = sum(p.numel() for p in vilt.parameters())
    assert backbone == 111_957_504
    sessions = [list(range(10))]
    for (E, r), (trainable, total) in TABLE5.items():
        recipe = load_recipe(None, ["data.make_synthetic=true", "backbone.image_size=384",
                                    f"method.delo.experts={E}", f"method.delo.rank={r}",
                                    f"method.delo.factor_rank={r}"]
                             + [f"backbone.tiny.{k}={v}" for k, v in VILT_B32.items()])
        with torch.device("meta"):
            model = ContinualModel(recipe, sessions, 10)
        counts = model.parameter_counts()
        per = counts["sessions"][0]
        assert len(model.adapted) == 36 and per["head"] == 768 * 10 + 10
        assert per["trainable"] == sum(p.numel() for p in model.session_parameters(0).values())
        assert round(per["trainable"] / 1e6, 1) == trainable, (E, r, per)
        assert round((backbone + 10 * per["trainable"]) / 1e6, 1) == total, (E, r)
    # the equations' literal rank-one pairs (factor_rank 1) at E=16, r=4: 7.09M, not 12.4M
    recipe = load_recipe(None, ["data.make_synthetic=true", "backbone.image_size=384",
                                "method.delo.factor_rank=1"]
                         + [f"backbone.tiny.{k}={v}" for k, v in VILT_B32.items()])
    with torch.device("meta"):
        literal = ContinualModel(recipe, sessions, 10).parameter_counts()["sessions"][0]
    assert literal["trainable"] == 7_087_882


@pytest.mark.slow  # two processes, DeepSpeed ZeRO-2 over gloo, against one process
def test_deepspeed_accumulation_matches_one_process(shards, tmp_path):
    """Global batch 16: 2 ranks x micro-batch 4 x accumulation 2 (DeepSpeed) and 1 process x
    16 (torch) train the same steps: the losses agree, AP within one test sample."""
    import json

    from tests.test_distributed import TOLERANCE, launch
    from tests.conftest import tiny_overrides
    common = {"data.sessions": 1, "train.global_batch_size": 16}
    launch(1, tiny_overrides(shards, tmp_path / "one", **common, **{"train.batch_size": 16}))
    done = launch(2, tiny_overrides(shards, tmp_path / "two", **common, **{"train.batch_size": 4}))
    assert "batch: 4 x 2 accumulated x 2 devices = 16 a step" in done.stdout
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert two["sessions"][0]["engine"] == "deepspeed" and two["world_size"] == 2
    assert abs(one["ap"] - two["ap"]) <= TOLERANCE and abs(one["fg"] - two["fg"]) <= TOLERANCE
    for a, b in zip(one["sessions"], two["sessions"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
