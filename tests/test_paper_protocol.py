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
from delo_dist.models.vilt import ViltBackbone, extend_text_positions, offline_tokenizer

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
                         text_position_rule=rule)
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
    from delo_dist.config import Recipe
    from delo_dist.training.trainer import Trainer
    t = Trainer.__new__(Trainer)            # scoring only: no setup, no model
    t.recipe = Recipe()
    t.recipe.eval.multilabel_classes = mode
    t.multilabel = True
    t.manifest = {"num_classes": 4, "sessions": [{"classes": [0, 1]}, {"classes": [2, 3]}]}
    return t


def test_macro_f1_over_seen_or_session_classes():
    # session 0's test set after 2 sessions: (key, labels, pred, oracle pred, routed session)
    rows = [("a", [0, 2], [0], [0], 0), ("b", [1], [1, 2], [1], 1), ("c", [0], [], [], 0)]
    # class 0: tp 1 fn 1 -> 2/3; class 1: tp 1 -> 1; class 2: fp 1 fn 1 -> 0; class 3: empty -> 0
    perf, oracle, routing = _scorer("session")._score(rows, 0, 2)
    assert perf == pytest.approx((2 / 3 + 1) / 2) and oracle == pytest.approx((2 / 3 + 1) / 2)
    assert routing == pytest.approx(2 / 3)
    perf, oracle, _ = _scorer("seen")._score(rows, 0, 2)
    assert perf == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    assert oracle == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)  # oracle: class 2 missed (fn)
    assert _scorer("seen")._score(rows, 0, 1)[0] == pytest.approx(5 / 6)  # only session 0 seen


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
