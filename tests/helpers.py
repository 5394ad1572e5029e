"""What the tests share besides fixtures (conftest.py): the environment of a launched job, a
free port, a real MLflow server, a model built as the trainer builds it, one collated batch."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel


def job_env(**extra) -> dict:
    """The environment of a job a test launches: one thread, and no exported tracking URI
    (MLFLOW_TRACKING_URI wins over a recipe's store: the test reads the store it gave)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, auth: bool = False,
                  secret: str = "", timeout: float = 180):
    """`mlflow server` on 127.0.0.1 (a free port unless given; sqlite store and artifacts under
    root; the basic-auth app with admin password `secret` if `auth`); yields (URI, process).
    Stopped with its whole process group (it forks workers)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ}
    extra = []
    if auth:
        extra = ["--app-name", "basic-auth"]
        env.update(MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret", MLFLOW_AUTH_ADMIN_PASSWORD=secret)
    log_path = root / f"server-{port}.log"
    log = open(log_path, "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), *extra],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}: "
                                   f"{log_path.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                    break
            except urllib.error.HTTPError:
                break                        # answering (an auth app may refuse anonymous)
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {uri} within {timeout} s")
            time.sleep(0.5)
        yield uri, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def model_for(recipe) -> tuple[dict, ContinualModel]:
    """(manifest, model) for a recipe, built as the trainer builds it (seed 0)."""
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(0)
    return m, ContinualModel(recipe, [s["classes"] for s in m["sessions"]], m["num_classes"])


def batch_of(model, m: dict, shards, session: int, split: str = "train", n: int = 8,
             eta: float = 0.5) -> dict:
    """The first collated batch of a session's split, eta of it missing (both kinds)."""
    table = missing_table(m["sessions"][session]["splits"][split]["keys"],
                          MissingSpec(eta, "both", 0.5), session, split)
    return next(iter(SessionStream(shards, m, session, split, n, model.backbone.collate, table,
                                   train=False)))
