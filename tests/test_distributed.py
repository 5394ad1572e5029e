"""Two real processes on gloo with DeepSpeed ZeRO-2, against one process (torch engine).

Same recipe, seed and global batch (1 x 16 and 2 x 8). The stream gives both the same global
batches, the losses are normalised to global means, the task keys are updated from
all-reduced means: the two runs are the same experiment and differ only in floating-point
reduction order (gradient all-reduce, ZeRO's flat partitions). Tolerance on AP/FG: 0.02
absolute, i.e. less than one test sample of the 32 per session changing its answer.
Evaluation of one checkpoint on 1 and 2 ranks must agree exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_overrides
from tests.helpers import free_port

pytestmark = pytest.mark.slow
TOLERANCE = 0.02
# the analytic identifier hashed to 128 dims: its count sketch must be the same on each rank
SKETCH = {"task_id.analytic.max_dims": 128, "task_id.analytic.reduce": "sketch"}


def launch(nproc: int, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml", *overrides]
    else:
        cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/cpu_2proc_zero2.yaml",
               "--main_process_port", str(free_port()), "delo_dist/train.py",
               "recipes/quickstart.yaml", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    common = {"data.sessions": 2, "train.epochs": 2, **SKETCH}
    one = launch(1, tiny_overrides(shards, root / "one", **common, **{"train.batch_size": 16}))
    two = launch(2, tiny_overrides(shards, root / "two", **common, **{"train.batch_size": 8}))
    return root, one, two


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_two_ranks_train_the_same_experiment_as_one(runs):
    root, _, _ = runs
    one, two = metrics(root / "one"), metrics(root / "two")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["sessions"][0]["engine"] == "torch" and two["sessions"][0]["engine"] == "deepspeed"
    assert abs(one["ap"] - two["ap"]) <= TOLERANCE and abs(one["fg"] - two["fg"]) <= TOLERANCE
    for a, b in zip(sum(one["accuracy_matrix"], []), sum(two["accuracy_matrix"], [])):
        assert abs(a - b) <= 1 / 32 + 1e-9                 # at most one test sample moved
    assert one["sessions"][1]["train_loss"] == pytest.approx(two["sessions"][1]["train_loss"], rel=1e-3)


def test_zero2_halves_optimizer_state_per_rank_and_keys_agree(runs):
    root, _, _ = runs
    one, two = metrics(root / "one"), metrics(root / "two")
    for s1, s2 in zip(one["sessions"], two["sessions"]):
        ranks = s2["per_rank"]
        assert [r["rank"] for r in ranks] == [0, 1]
        for r in ranks:
            ratio = r["optimizer_state_bytes"] / s1["optimizer_state_bytes"]
            assert 0.45 < ratio < 0.56, ratio              # ZeRO partitions, plus padding
            assert r["trainable_params"] == s1["trainable_params"]
        assert ranks[0]["task_id_sha"] == ranks[1]["task_id_sha"]


def test_session_0_unchanged_by_session_1_under_zero2(runs):
    root, _, _ = runs
    ckpt = root / "two" / "checkpoints"
    a, b = load_file(str(ckpt / "session_00/model.safetensors")), load_file(str(ckpt / "session_01/model.safetensors"))
    names = [n for n in a if ".sessions.0." in n or n.startswith("heads.0.")]
    assert names and all(torch.equal(a[n], b[n]) for n in names)
    # the task identifier's session-0 rows (EMA keys, or the analytic router's sums) are kept
    rows = [n for n in ("identifier.keys", "identifier.sums", "identifier.val_sums") if n in a]
    assert rows and all(torch.equal(a[n][0], b[n][0]) for n in rows)


def test_task_identifier_state_of_two_ranks_is_the_one_rank_state(runs):
    """All-reduced statistics: the 2-rank state equals the 1-rank state up to float32 noise
    in the features (and every rank holds the same bytes: task_id_sha above)."""
    root, _, _ = runs
    one = load_file(str(root / "one" / "checkpoints" / "session_01" / "model.safetensors"))
    two = load_file(str(root / "two" / "checkpoints" / "session_01" / "model.safetensors"))
    names = [n for n in one if n.startswith("identifier.")]
    assert names and names == [n for n in two if n.startswith("identifier.")]
    for n in names:
        if n.endswith(("gram", "sums", "counts", "keys")):
            assert torch.allclose(one[n], two[n], rtol=1e-5, atol=1e-6), n
    for n in ("identifier.sketch_bucket", "identifier.sketch_sign", "identifier.layout"):
        assert torch.equal(one[n], two[n]), n                       # the same projection
    if "identifier.ridge" in one:
        # the same grid point: lambda = grid value x mean diag(G), G summed in another order
        assert one["identifier.ridge"].item() == pytest.approx(two["identifier.ridge"].item(), rel=1e-7)


def test_one_checkpoint_evaluates_identically_on_one_and_two_ranks(runs, shards):
    root, _, _ = runs
    ckpt = root / "two" / "checkpoints" / "session_01"
    evals = {}
    for n in (1, 2):
        extra = {"eval.checkpoint": str(ckpt), "eval.batch_size": 7, **SKETCH}
        if n == 1:
            extra["distributed.engine"] = "torch"
        launch(n, tiny_overrides(shards, root / f"eval{n}", **extra))
        evals[n] = json.loads((root / f"eval{n}" / "eval.json").read_text())
    assert evals[2]["world_size"] == 2 and evals[1]["seen"] == 2
    for key in ("performance", "oracle_performance", "routing_accuracy"):
        assert evals[1][key] == evals[2][key]
    assert evals[1]["performance"] == metrics(root / "two")["accuracy_matrix"][-1]


def test_launch_and_recipe_disagreements_are_refused(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
           *tiny_overrides(shards, tmp_path / "x", **{"distributed.engine": "deepspeed"})]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs 2 or more processes" in done.stderr


def test_zero2_resumes_mid_session_from_its_partitioned_state(shards, tmp_path):
    """A mid-session checkpoint under ZeRO-2 (each rank's partition of the AdamW state in
    safetensors) restarts the session where it stopped and ends exactly where the
    uninterrupted run ended."""
    import shutil
    extra = {"data.sessions": 2, "train.epochs": 3, "train.checkpoint_every": 5}
    launch(2, tiny_overrides(shards, tmp_path / "full", **extra))
    ckpt = tmp_path / "full" / "checkpoints" / "latest_step"
    assert {p.name for p in ckpt.iterdir()} >= {"engine-rank0.safetensors", "engine-rank1.safetensors"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["mid_session"] and state["session"] == 1
    shutil.copytree(tmp_path / "full", tmp_path / "cut")       # as if killed at that step
    (tmp_path / "cut" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "session_01")
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("latest_step")
    done = launch(2, tiny_overrides(shards, tmp_path / "cut", **extra))
    assert "resuming from" in done.stdout
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    for key in ("accuracy_matrix", "oracle_matrix", "routing_matrix", "ap", "fg"):
        assert a[key] == b[key], key
    assert [s["train_loss"] for s in a["sessions"]] == [s["train_loss"] for s in b["sessions"]]
