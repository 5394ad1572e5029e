"""delo_dist.compare against a real MLflow tracking server on 127.0.0.1 (sqlite backend):
two tiny training runs, plus a failed and a running run made through the MLflow client."""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from delo_dist.compare import Cell, Run, modality_pct

EXPERIMENT = "compare-test"


@contextlib.contextmanager
def mlflow_server(root: Path, timeout: float = 120):
    """`mlflow server` on a free 127.0.0.1 port, sqlite backend, artifacts under root; yields
    its URI. Stopped (its whole process group: it forks workers) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}: "
                                   f"{(root / 'mlflow-server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {uri} within {timeout} s")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def train(shards: Path, out: Path, uri: str, **extra) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
           *tiny_overrides(shards, out, **{"tracking.experiment": EXPERIMENT, **extra})]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_modality_percentages_and_cells():
    assert modality_pct("text", 0.7, 0.5) == (100.0, pytest.approx(30.0))
    assert modality_pct("image", 0.7, 0.5) == (pytest.approx(30.0), 100.0)
    assert modality_pct("both", 0.7, 0.5) == (pytest.approx(65.0), pytest.approx(65.0))
    assert modality_pct("both", 0.5, 0.2) == (pytest.approx(90.0), pytest.approx(60.0))
    run = lambda ap, status="finished": Run("x", "delo", "both", 0.7, 0.5, status, ap, 0.1)  # noqa: E731
    assert Cell([run(0.5), run(0.6), run(None, "failed")]).text("ap") == "55.00 (n=2; failed)"
    assert Cell([run(0.5)]).text("fg") == "10.00"
    assert Cell([run(None, "running"), run(None, "running")]).text("ap") == "2 running"


@pytest.mark.slow
def test_compare_table_matches_the_runs(shards, tmp_path):
    from mlflow.tracking import MlflowClient
    with mlflow_server(tmp_path) as uri:
        # Two finished runs in one setting (two methods), different seeds elsewhere.
        train(shards, tmp_path / "delo", uri, **{"method.name": "delo", "data.eta": 0.7,
                                                 "data.missing_type": "both"})
        train(shards, tmp_path / "lora", uri, **{"method.name": "lora", "data.eta": 0.7,
                                                 "data.missing_type": "both"})
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        tags = {"dataset": "synthetic", "eta": "0.7", "missing_type": "both", "both_ratio": "0.5"}
        failed = client.create_run(exp, tags={**tags, "method": "delo", "seed": "1"})
        client.log_metric(failed.info.run_id, "final_ap", 0.99)  # must not be averaged in
        client.set_terminated(failed.info.run_id, "FAILED")
        client.create_run(exp, tags={**tags, "method": "lora", "eta": "0.3", "missing_type": "text"})

        out = tmp_path / "cmp"
        done = subprocess.run([sys.executable, "-m", "delo_dist.compare", "--tracking-uri", uri,
                               "--experiment", EXPERIMENT, "--dataset", "synthetic", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

        runs = {r.data.tags["method"]: r for r in client.search_runs([exp], "attributes.status = 'FINISHED'")
                if "final_ap" in r.data.metrics}
        assert set(runs) == {"delo", "lora"}
        ap = {m: f"{100 * r.data.metrics['final_ap']:.2f}" for m, r in runs.items()}
        fg = {m: f"{100 * r.data.metrics['final_fg']:.2f}" for m, r in runs.items()}

        lines = (out / "compare.md").read_text().splitlines()
        assert lines[0] == "| eta | image % | text % | delo AP | delo FG | lora AP | lora FG |"
        assert lines[-2:] == ["", "performance: accuracy"]      # the runs' metric tag
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:-2]]
        assert rows == [
            ["30%", "100.00", "70.00", "-", "-", "running", "running"],
            ["70%", "65.00", "65.00", f"{ap['delo']} (failed)", f"{fg['delo']} (failed)",
             ap["lora"], fg["lora"]],
        ]
        table = list(csv.DictReader(open(out / "compare.csv")))
        assert float(table[1]["delo_ap"]) == pytest.approx(100 * runs["delo"].data.metrics["final_ap"], abs=1e-5)
        assert table[1]["delo_n"] == "1" and table[1]["delo_unfinished"] == "failed"
        assert table[0]["lora_ap"] == "" and table[0]["lora_unfinished"] == "running"
        assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        summary = client.search_runs([exp], "tags.kind = 'compare-summary'")
        assert len(summary) == 1
        logged = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
        assert logged == {"compare.md", "compare.csv", "compare.png"}
