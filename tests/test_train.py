"""The spine end to end: the real entry point, metrics.json, the heatmap, the MLflow run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from delo_dist import metrics as M
from delo_dist.training.trainer import Trainer
from tests.conftest import REPO, tiny_overrides


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_three_sessions_metrics_json_heatmap_and_mlflow(recipe_for):
    recipe = recipe_for()
    assert Trainer(recipe).run() == 0
    out = recipe.output_dir
    res = json.loads(open(f"{out}/metrics.json").read())
    matrix = res["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3]
    assert res["ap"] == pytest.approx(sum(matrix[-1]) / 3)
    assert res["fg"] == pytest.approx(M.forgetting(matrix))
    assert res["chance"] == pytest.approx(1 / 12) and res["metric"] == "accuracy"
    assert [s["session"] for s in res["sessions"]] == [0, 1, 2]
    assert all(s["trainable_params"] > 0 and s["optimizer_state_bytes"] > 0 for s in res["sessions"])
    assert res["missing"]["s0_train"]["complete"] == pytest.approx(0.3, abs=0.02)  # eta 0.7
    assert open(f"{out}/accuracy_matrix.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "method:" in open(f"{out}/recipe.resolved.yaml").read()

    mlflow.set_tracking_uri(recipe.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[recipe.tracking.experiment], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    client = MlflowClient(tracking_uri=recipe.tracking.uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "delo" and run.data.tags["dataset"] == "synthetic"
    assert run.data.tags["eta"] == "0.7" and run.data.tags["missing_type"] == "both"
    ap_history = client.get_metric_history(run.info.run_id, "ap")
    assert [m.step for m in ap_history] == [0, 1, 2]
    assert ap_history[-1].value == pytest.approx(res["ap"])
    assert len(client.get_metric_history(run.info.run_id, "perf_s0")) == 3
    assert len(client.get_metric_history(run.info.run_id, "perf_s2")) == 1
    assert run.data.params["method.name"] == "delo"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "accuracy_matrix.png", "recipe.resolved.yaml"} <= artifacts


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_accelerate_launch_entry_point(shards, tmp_path):
    """The README's command, for real: `accelerate launch delo_dist/train.py RECIPE k=v`."""
    out = tmp_path / "cli"
    cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/default.yaml", "delo_dist/train.py",
           "recipes/quickstart.yaml", *tiny_overrides(shards, out, **{"data.sessions": 2})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final: AP" in done.stdout and "session 1: perf" in done.stdout
    assert "values were not passed" not in done.stderr    # the shipped config says them all
    assert len(json.loads((out / "metrics.json").read_text())["accuracy_matrix"]) == 2


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_cli_rejects_a_bad_recipe_before_training(shards, tmp_path):
    cmd = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
           *tiny_overrides(shards, tmp_path / "bad"), "method.delo.rank=99"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "command line: override 'method.delo.rank=99'" in done.stderr
    assert "'method.delo.rank'" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_from_pretrained_path_loads_the_same_model(recipe_for, tmp_path):
    """No hub here: the real `from_pretrained` path runs on a tiny ViLT saved to disk."""
    from delo_dist.models.adapters import RoutingContext
    from delo_dist.models.vilt import ViltBackbone
    torch.manual_seed(0)
    tiny = ViltBackbone(recipe_for().backbone, RoutingContext(enabled=False))
    tiny.vilt.save_pretrained(tmp_path / "vilt")
    tiny.tokenizer.save_pretrained(tmp_path / "vilt")
    loaded = ViltBackbone(recipe_for(**{"backbone.pretrained": str(tmp_path / "vilt")}).backbone,
                          RoutingContext(enabled=False))
    samples = [{"key": "k", "jpg": None, "txt": "spicy soup", "label": 0, "session": 0, "status": 2}]
    batch = tiny.collate(samples)
    assert torch.equal(batch["input_ids"], loaded.collate(samples)["input_ids"])
    assert torch.allclose(tiny(batch), loaded(batch), atol=1e-6)
    assert all(not p.requires_grad for p in loaded.parameters())   # frozen


def test_dummy_inputs_and_token_masks(recipe_for):
    from delo_dist.models.adapters import RoutingContext
    from delo_dist.models.vilt import ViltBackbone
    ctx = RoutingContext(enabled=False)
    bb = ViltBackbone(recipe_for().backbone, ctx)
    from PIL import Image
    from delo_dist.data.shards import encode_jpeg
    jpg = encode_jpeg(Image.new("RGB", (32, 32), (0, 0, 0)))
    samples = [{"key": str(s), "jpg": jpg, "txt": "sweet cake", "label": 0, "session": 0, "status": s}
               for s in (0, 1, 2)]
    b = bb.collate(samples)
    assert b["missing_text"].tolist() == [False, True, False]
    assert b["attention_mask"][1].sum() == 2                         # [CLS] [SEP]: empty text
    assert torch.all(b["pixel_values"][2] == 1.0)                   # all-ones dummy image
    assert torch.all(b["pixel_values"][0] == -1.0)                  # black, normalised
    bb(b)
    n_text = b["input_ids"].shape[1]
    assert torch.equal(ctx.text_tokens[:, :n_text].sum(1), b["attention_mask"].sum(1))
    assert ctx.image_tokens.sum(1).tolist() == [1 + (32 // 16) ** 2] * 3   # [CLS] + patches
    assert not (ctx.text_tokens & ctx.image_tokens).any()


def test_offline_tokenizer_knows_the_synthetic_words():
    """Every synthetic word is one real token (transformers 5 once ignored the vocab file and
    mapped every word to [UNK], so the text carried nothing)."""
    from delo_dist.data.synthetic import VOCAB_WORDS
    from delo_dist.models.vilt import offline_tokenizer
    tok = offline_tokenizer()
    ids = tok(" ".join(VOCAB_WORDS), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(VOCAB_WORDS) and tok.unk_token_id not in ids
    assert len(set(ids)) == len(set(VOCAB_WORDS))
    assert tok.unk_token_id not in tok("zxq 42")["input_ids"]        # characters as fallback
