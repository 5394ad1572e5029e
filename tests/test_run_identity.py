"""Run identity: a relaunch on an output folder continues it only with the same result-shaping
recipe and data; one live job per folder (a real second process holds the lock)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest

from delo_dist.config import load_recipe
from delo_dist.training import run_identity
from delo_dist.training.run_lock import RunLock
from delo_dist.training.trainer import LaunchError, Trainer
from tests.conftest import REPO, tiny_overrides


def recipe(shards, out, **extra):
    return load_recipe(REPO / "recipes" / "quickstart.yaml",
                       tiny_overrides(shards, out, **{"data.sessions": 1, **extra}))


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_changed_recipe_on_a_finished_folder_is_refused_and_rewrites_nothing(shards, tmp_path, capsys):
    out = tmp_path / "run"
    first = recipe(shards, out)
    assert Trainer(first).run() == 0
    before = {n: (out / n).read_bytes() for n in ("metrics.json", "recipe.resolved.yaml", "run.json")}
    client = mlflow.MlflowClient(first.tracking.uri)
    run_id = (out / "mlflow_run_id").read_text()
    artifacts = [(a.path, a.file_size) for a in client.list_artifacts(run_id)]

    changed = recipe(shards, out, **{"train.epochs": 2, "method.delo.lambda_con": 0.3, "eval.batch_size": 8})
    with pytest.raises(LaunchError) as e:
        Trainer(changed).run()
    msg = str(e.value)
    assert "train.epochs: 1 -> 2" in msg and "method.delo.lambda_con: 0.1 -> 0.3" in msg
    assert "neutral keys differing, allowed: eval.batch_size: 16 -> 8" in msg
    assert {n: (out / n).read_bytes() for n in before} == before
    assert [(a.path, a.file_size) for a in client.list_artifacts(run_id)] == artifacts
    assert client.get_run(run_id).info.status == "FINISHED"

    # only result-neutral keys changed: allowed, and a finished run is left as it is
    capsys.readouterr()
    assert Trainer(recipe(shards, out, **{"eval.batch_size": 8, "train.log_every": 5})).run() == 0
    said = capsys.readouterr().out
    assert "eval.batch_size: 16 -> 8" in said and "nothing to do" in said
    assert {n: (out / n).read_bytes() for n in before} == before
    assert len(client.get_metric_history(run_id, "ap")) == 1


def test_other_data_under_the_same_folder_is_refused(tmp_path):
    run_identity.record(tmp_path, {"seed": 0}, "a" * 64)
    run_identity.check_data(tmp_path, "a" * 64)
    with pytest.raises(run_identity.RunIdentityError, match="on other data"):
        run_identity.check_data(tmp_path, "b" * 64)


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_recipe_and_hashes_are_recorded_at_start(shards, tmp_path):
    """Recorded before training: a job preempted in its first session is already identified."""
    r = recipe(shards, tmp_path / "run")
    t = Trainer(r)
    t.setup()
    t.lock.release()
    t.tracker.end("KILLED")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (tmp_path / "run" / "recipe.resolved.yaml").is_file()
    assert info["manifest_sha256"] == t.manifest_sha and len(info["result_sha256"]) == 64
    run = mlflow.MlflowClient(r.tracking.uri).get_run(t.tracker.run_id)
    assert run.data.params["data.manifest_sha256"] == t.manifest_sha
    assert run.data.tags["data.manifest_sha256"] == t.manifest_sha


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_one_live_job_per_folder_and_a_dead_jobs_lock_is_taken_over(shards, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from delo_dist.training.run_lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LaunchError, match=f"another job is using this output folder \\(pid {holder.pid} on host"):
            Trainer(recipe(shards, out)).run()
        assert not (out / "mlflow_run_id").exists()       # refused before the tracker
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out)
    note = lock.acquire()
    assert f"taking over the lock of pid {holder.pid}" in note
    lock.release()
    assert RunLock(out).acquire() is None                 # released cleanly: nothing to take over
