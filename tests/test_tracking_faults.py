"""Tracking that cannot stall training, against real `mlflow server` processes on 127.0.0.1:
down at start (a clear error within seconds), killed mid-run (training completes, `sync`
completes the run afterwards), a run left RUNNING by a dead job (marked KILLED on relaunch),
and an authenticated server (credentials from the environment; a client without them is
refused)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from delo_dist.tracking import BUFFER_FILE, Tracker, TrackingUnreachable, probe
from tests.conftest import REPO, tiny_overrides
from tests.helpers import free_port, job_env, mlflow_server as _server

ADMIN = ("admin", "a-long-test-secret-0123")


def mlflow_server(root: Path, port: int, auth: bool = False):
    return _server(root, port, auth=auth, secret=ADMIN[1])


def command(shards, out, uri, **extra):
    return [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
            *tiny_overrides(shards, out, **{"tracking.uri": uri, **extra})]


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_server_down_at_start_is_a_clear_error(shards, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"                     # nothing listens there
    done = subprocess.run(command(shards, tmp_path / "run", uri), cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"MLflow tracking server {uri} did not answer" in done.stderr
    assert "unset MLFLOW_TRACKING_URI" in done.stderr and "sqlite" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_left_running_by_a_dead_job_is_marked_killed(recipe_for, capsys):
    r = recipe_for()
    Path(r.output_dir).mkdir(parents=True)
    first = Tracker(r, enabled=True)                  # a job that died without ending its run
    again = Tracker(r, enabled=True)
    assert again.run_id == first.run_id
    run = mlflow.MlflowClient(r.tracking.uri).get_run(first.run_id)
    assert run.data.tags["killed_attempts"] == "1" and run.info.status == "RUNNING"
    assert "marked KILLED" in capsys.readouterr().out
    again.end("FINISHED")


def test_credentials_never_reach_params(recipe_for, monkeypatch):
    with pytest.raises(Exception, match="without credentials"):
        recipe_for(**{"tracking.uri": "http://bob:hunter2@127.0.0.1:5000"})
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    r = recipe_for(**{"tracking.tags": "{note: hunter2}"})
    Path(r.output_dir).mkdir(parents=True)
    t = Tracker(r, enabled=True)
    t.end("FINISHED")
    run = mlflow.MlflowClient(r.tracking.uri).get_run(t.run_id)
    assert "hunter2" not in json.dumps([run.data.params, run.data.tags])


@pytest.mark.slow
def test_a_server_killed_mid_run_loses_nothing(shards, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    extra = {"data.sessions": 2, "train.epochs": 3, "tracking.experiment": "faults"}
    with mlflow_server(tmp_path / "server", port) as (uri, server):
        job = subprocess.Popen(command(shards, out, uri, **extra), cwd=REPO, env=job_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not (out / "checkpoints" / "session_00" / "state.json").exists():
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        log = job.communicate(timeout=600)[0]
    assert job.returncode == 0, log[-3000:]
    res = json.loads((out / "metrics.json").read_text())
    assert len(res["accuracy_matrix"]) == 2
    assert (out / BUFFER_FILE).is_file() and "delo_dist.tracking sync" in log

    with mlflow_server(tmp_path / "server", port) as (uri, _):
        done = subprocess.run([sys.executable, "-m", "delo_dist.tracking", "sync", str(out)],
                              cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert not (out / BUFFER_FILE).exists()
        client = mlflow.MlflowClient(uri)
        run = client.get_run((out / "mlflow_run_id").read_text())
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "ap")] == [0, 1]
        assert run.data.metrics["final_ap"] == pytest.approx(res["ap"])
        assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_an_authenticated_server_takes_jobs_with_credentials_only(shards, tmp_path):
    with mlflow_server(tmp_path / "server", free_port(), auth=True) as (uri, _):
        with pytest.raises(TrackingUnreachable, match="refused this job"):
            probe(uri)                                   # no credentials in this environment
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert e.value.code == 401
        creds = {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
        out = tmp_path / "run"
        done = subprocess.run(command(shards, out, uri, **{"data.sessions": 1, "tracking.experiment": "auth"}),
                              cwd=REPO, env=job_env(**creds), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        os.environ.update(creds)
        try:
            client = mlflow.MlflowClient(uri)
            run = client.get_run((out / "mlflow_run_id").read_text())
        finally:
            for k in creds:
                os.environ.pop(k)
        assert run.info.status == "FINISHED"
        assert ADMIN[1] not in json.dumps([run.data.params, run.data.tags])
        assert ADMIN[1] not in (out / "recipe.resolved.yaml").read_text()
