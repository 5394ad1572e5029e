"""Shared fixtures: a tiny synthetic benchmark written once per test session, and recipes
for a tiny random ViLT. Everything is real: real JPEG tars, real transformers models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from delo_dist.config import load_recipe
from delo_dist.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

TINY = dict(sessions=3, classes_per_session=4, train_per_class=16, val_per_class=2,
            test_per_class=8, image_size=32, samples_per_shard=24, seed=0)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Every test starts without MLFLOW_TRACKING_URI (it wins over a recipe's store, so a URI
    exported in the shell, or left by mlflow.set_tracking_uri() in an earlier test, would send
    the runs elsewhere than the store the test reads), and the shell's value is back after."""
    before = os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow
    mlflow.set_tracking_uri(None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """3 sessions x 4 classes, 64 train / 32 test samples a session, 3 train shards each."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(root, progress=False, **TINY)


def tiny_overrides(shards: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.shards": str(shards), "data.shuffle_buffer": 32,
        "backbone.image_size": 32, "backbone.max_text_len": 12,
        "backbone.tiny.hidden_size": 32, "backbone.tiny.intermediate_size": 64,
        "backbone.tiny.num_attention_heads": 2,
        "method.delo.experts": 4, "method.delo.rank": 2, "method.lora.rank": 2,
        "train.epochs": 1, "train.batch_size": 8, "train.log_every": 2,
        "train.global_batch_size": "null",   # batch_size per process, whatever the recipe says
        "eval.batch_size": 16, "output_dir": str(out),
        "tracking.uri": f"sqlite:///{out.parent / 'mlflow.db'}",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def recipe_for(shards, tmp_path):
    def make(**extra):
        return load_recipe(REPO / "recipes" / "quickstart.yaml",
                           tiny_overrides(shards, tmp_path / "run", **extra))
    return make
