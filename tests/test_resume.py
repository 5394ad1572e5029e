"""Preemption: SIGTERM mid-session -> checkpoint, exit 75; relaunch -> the same metrics.json
as a run never interrupted, in the same MLflow run.

One process (torch engine) with no randomness left unrestored (model, AdamW and schedule
state, the stream position, torch and Python RNG), so the comparison is exact."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from delo_dist.training.trainer import EXIT_PREEMPTED
from tests.conftest import REPO, tiny_overrides
from tests.helpers import job_env

pytestmark = pytest.mark.slow
COMPARED = ("accuracy_matrix", "oracle_matrix", "routing_matrix", "ap", "fg", "oracle_ap")


def command(overrides):
    return [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml", *overrides]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_killed_mid_session_resumes_to_the_same_result(shards, tmp_path, sig):
    extra = {"data.sessions": 2, "train.epochs": 6, "tracking.experiment": f"resume-{sig.name}"}
    straight = tmp_path / "straight"
    done = subprocess.run(command(tiny_overrides(shards, straight, **extra)), cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    overrides = tiny_overrides(shards, out, **extra)
    proc = subprocess.Popen(command(overrides), cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / "session_00" / "state.json"
    deadline = time.time() + 300
    while not marker.exists():        # session 0 finished: session 1 is training now
        assert proc.poll() is None and time.time() < deadline, "run ended before session 1"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    state = json.loads((out / "checkpoints" / "latest_step" / "state.json").read_text())
    assert state["session"] == 1 and state["mid_session"]
    assert (out / "checkpoints" / "latest").read_text() == "latest_step"
    assert not (out / "metrics.json").exists()

    again = subprocess.run(command(overrides), cwd=REPO, env=job_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in COMPARED:
        assert a[key] == b[key], key
    assert [s["train_loss"] for s in a["sessions"]] == [s["train_loss"] for s in b["sessions"]]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[extra["tracking.experiment"]], output_format="list")
    mine = [r for r in runs if r.data.tags["output_dir"] == str(out.resolve())]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(mine[0].info.run_id, "ap")] == [0, 1]
