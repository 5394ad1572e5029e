"""MLflow logging from the main process only, one run per training job.

The run id is written beside the checkpoints (`<output_dir>/mlflow_run_id`, and with the URI
in `tracking.json`): a resumed job logs into the same run instead of opening a second one.
Every exit path sets a status: FINISHED, FAILED on an exception, KILLED when preempted (the
resumed job sets it RUNNING; a run left RUNNING by a job that died is marked KILLED first).
Default store: sqlite in the output root (the output dir's parent), unless
MLFLOW_TRACKING_URI is set or the recipe names one.

Tracking never stalls training: a server URI is probed (a few seconds) before any work, and
an unreachable one is an error naming it; during the run metrics.json is the source of truth,
MLflow HTTP calls have short timeouts and few retries, and a failed call switches the job to
buffering: every record goes to `<output_dir>/tracking_buffer.jsonl` (on disk, so a crash
loses nothing), retried at each session end. `python -m delo_dist.tracking sync OUTPUT_DIR`
uploads what is left into the same run. Credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)
come from the environment only and are never logged.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from delo_dist.config import Recipe, flatten, to_dict
from delo_dist.data.files import atomic_write_text

RUN_ID_FILE = "mlflow_run_id"
TRACKING_FILE = "tracking.json"
BUFFER_FILE = "tracking_buffer.jsonl"
PROBE_TIMEOUT_S = (5, 20)   # connect (a dead host), read (a live but busy server)
# MLflow's own defaults (120 s timeout, 7 retries with backoff factor 2) stall a job for
# minutes per call when the server is down. Read by mlflow at each request (mlflow 3.x
# rest_utils), so setting them before the first call is enough; a user's values win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
OFFLINE_HINT = ("to run without the server, unset MLFLOW_TRACKING_URI and leave tracking.uri "
                "unset (a local sqlite store beside the output dir) or set "
                "tracking.uri=sqlite:///outputs/mlflow.db")


class TrackingUnreachable(RuntimeError):
    """The tracking server cannot be reached or refuses this job."""


def resolve_uri(recipe: Recipe) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.uri
            or default_uri(recipe.output_dir))


def redact(text: str) -> str:
    """Remove credentials from a value about to be logged or printed."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", str(text))
    secret = os.environ.get("MLFLOW_TRACKING_PASSWORD") or os.environ.get("MLFLOW_TRACKING_TOKEN")
    return text.replace(secret, "***") if secret else text


def probe(uri: str, timeout: tuple[float, float] = PROBE_TIMEOUT_S) -> None:
    """Fail fast, before any work, if an HTTP tracking server is down or refuses us."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    try:
        resp = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                            params={"max_results": 1}, timeout=timeout, headers=headers,
                            auth=(user, password or "") if user else None)
    except requests.RequestException as e:
        raise TrackingUnreachable(f"MLflow tracking server {redact(uri)} did not answer "
                                  f"(waited {timeout[0]} s to connect, {timeout[1]} s for a reply: "
                                  f"{type(e).__name__}); {OFFLINE_HINT}") from None
    if resp.status_code in (401, 403):
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} refused this job (HTTP {resp.status_code}): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
    if resp.status_code >= 500:
        raise TrackingUnreachable(f"MLflow tracking server {redact(uri)} answered HTTP "
                                  f"{resp.status_code}; {OFFLINE_HINT}")


def default_uri(output_dir: str | Path) -> str:
    root = Path(output_dir).resolve().parent
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise store creation between processes sharing one sqlite file (array tasks would
    otherwise race through the schema migration)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment(mlflow, name: str, uri: str) -> str:
    """The experiment's id, created if needed; with a sqlite store its artifacts go beside the
    database, not into ./mlruns of whatever folder the job started in."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a process that does not share our lock
        return mlflow.get_experiment_by_name(name).experiment_id


def run_name(recipe: Recipe) -> str:
    """What a run is, at a glance in MLflow's list: 'quickstart: delo vilt-tiny both eta=0.7 seed=0'."""
    d, b = recipe.data, recipe.backbone
    backbone = Path(b.pretrained.rstrip("/")).name if b.pretrained else f"{b.name}-tiny"
    missing = "complete" if d.missing_type == "none" else f"{d.missing_type} eta={d.eta:g}"
    if d.missing_type == "both" and d.both_ratio != 0.5:
        missing += f" both_ratio={d.both_ratio:g}"
    return f"{recipe.name}: {recipe.method.name} {backbone} {missing} seed={recipe.seed}"


# MLflow announces creating and migrating a new sqlite store at INFO on the job's console.
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")


class Tracker:
    def __init__(self, recipe: Recipe, enabled: bool, manifest_sha256: str | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        self.offline = False
        if not enabled:
            return
        for k, v in HTTP_LIMITS.items():
            os.environ.setdefault(k, v)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        import mlflow
        self.mlflow = mlflow
        out = Path(recipe.output_dir)
        self.buffer = out / BUFFER_FILE
        uri = resolve_uri(recipe)
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        try:
            if self._open(recipe, out):
                return
        except Exception as e:  # noqa: BLE001 - any failure here leaves the job without a run
            what = "server" if uri.startswith(("http://", "https://")) else "store"
            raise TrackingUnreachable(
                f"MLflow tracking {what} {redact(uri)} failed while the job opened its run "
                f"({type(e).__name__}: {_reason(e)}); {OFFLINE_HINT}") from None
        self._first_records(recipe, out, manifest_sha256)

    def _open(self, recipe: Recipe, out: Path) -> bool:
        """Find or create the experiment, then reopen this folder's run (True) or create one."""
        id_file = out / RUN_ID_FILE
        with _store_lock(self.uri):
            experiment_id = _experiment(self.mlflow, recipe.tracking.experiment, self.uri)
            if id_file.is_file():  # resume the run this output dir already has
                self.run_id = id_file.read_text().strip()
                self._reopen()
                return True
            run = self.client.create_run(experiment_id,
                                         run_name=recipe.tracking.run_name or run_name(recipe))
        self.run_id = run.info.run_id
        return False

    def _first_records(self, recipe: Recipe, out: Path, manifest_sha256: str | None) -> None:
        uri = self.uri
        atomic_write_text(out / RUN_ID_FILE, self.run_id)
        atomic_write_text(out / TRACKING_FILE, json.dumps({"uri": redact(uri), "run_id": self.run_id}))
        params = {k: redact(v)[:500] for k, v in flatten(to_dict(recipe)).items()}
        if manifest_sha256:
            params["data.manifest_sha256"] = manifest_sha256
        self.log_params(params)
        d, m = recipe.data, recipe.method
        tags = {
            "dataset": d.dataset, "method": m.name, "backbone": recipe.backbone.pretrained or
            f"{recipe.backbone.name}-tiny", "eta": str(d.eta), "missing_type": d.missing_type,
            "both_ratio": str(d.both_ratio), "seed": str(recipe.seed), "git_commit": git_commit(),
            "output_dir": str(out.resolve()), "data.manifest_sha256": manifest_sha256 or "unknown",
        }
        for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
            if os.environ.get(var):
                tags[var.lower()] = os.environ[var]
        tags.update({k: str(v) for k, v in recipe.tracking.tags.items()})
        self.set_tags(tags)

    def _reopen(self) -> None:
        """Resume the run; one left RUNNING was not ended by its job (killed): say so first."""
        run = self.client.get_run(self.run_id)
        if run.info.status == "RUNNING":
            killed = int(run.data.tags.get("killed_attempts", "0")) + 1
            self.client.set_terminated(self.run_id, "KILLED")
            self.client.set_tag(self.run_id, "killed_attempts", str(killed))
            print(f"MLflow run {self.run_id} was left RUNNING by a job that died: marked KILLED, "
                  "resuming it", flush=True)
        self.client.update_run(self.run_id, status="RUNNING")
        self.flush()  # what a previous attempt could not upload

    # ---------------------------------------------------------------- records
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._record({"op": "metrics", "step": step, "ts": int(time.time() * 1000),
                      "values": {k: float(v) for k, v in metrics.items()}})

    def log_params(self, params: dict) -> None:
        self._record({"op": "params", "values": {k: redact(v)[:500] for k, v in params.items()}})

    def set_tags(self, tags: dict) -> None:
        self._record({"op": "tags", "values": {k: redact(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._record({"op": "artifact", "path": str(Path(path).resolve())})

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        self.flush()
        self._record({"op": "end", "status": status})
        if self.buffer.is_file():
            print(f"MLflow: {sum(1 for _ in self.buffer.open())} record(s) not uploaded to "
                  f"{redact(self.uri)}; they are in {self.buffer}: upload them with "
                  f"`python -m delo_dist.tracking sync {self.buffer.parent}`", flush=True)

    def flush(self) -> bool:
        """Retry the buffered records (called at session ends); True if none are left."""
        if not self.enabled or not self.buffer.is_file():
            return True
        ok = replay(self.client, self.run_id, self.buffer)
        self.offline = not ok
        return ok

    def _record(self, rec: dict) -> None:
        if not self.enabled:
            return
        if not self.offline:
            try:
                apply(self.client, self.run_id, rec)
                return
            except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
                self.offline = True
                print(f"MLflow at {redact(self.uri)} failed ({type(e).__name__}: "
                      f"{redact(str(e))[:200]}): training goes on, records are buffered in "
                      f"{self.buffer} and retried at session ends", flush=True)
        with self.buffer.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _reason(e: BaseException) -> str:
    """MLflow's messages can hold a whole HTML page or urllib3's retry chain: keep the request
    and its root cause ('.../get-by-name: [Errno 111] Connection refused'), else line one."""
    text = redact(str(e)).strip()
    request = re.match(r"API request to (\S+) failed", text)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Remote end closed connection without response|"
                      r"Read timed out|HTTP \d{3}[^,;]*", text)
    if request:
        return f"{request.group(1)}: {cause.group(0) if cause else 'no answer'}"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def apply(client, run_id: str, rec: dict) -> None:
    """Send one record to the run."""
    from mlflow.entities import Metric, Param, RunTag
    op = rec["op"]
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, rec["ts"], rec["step"])
                                          for k, v in rec["values"].items()])
    elif op == "params":
        items = [Param(k, str(v)) for k, v in rec["values"].items()]
        for i in range(0, len(items), 100):   # the REST API takes at most 100 params a call
            client.log_batch(run_id, params=items[i:i + 100])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["values"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, rec["path"])
    elif op == "end":
        client.set_terminated(run_id, rec["status"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def replay(client, run_id: str, buffer: Path) -> bool:
    """Send buffered records in order; keep the ones not sent. True if all went."""
    recs = [json.loads(line) for line in buffer.read_text().splitlines() if line.strip()]
    for i, rec in enumerate(recs):
        try:
            apply(client, run_id, rec)
        except Exception:  # noqa: BLE001 - still unreachable: keep the rest for later
            atomic_write_text(buffer, "".join(json.dumps(r) + "\n" for r in recs[i:]))
            return False
    buffer.unlink()
    return True


def sync(out: Path) -> int:
    """Upload an output folder's buffered records into its run."""
    out = Path(out)
    buffer = out / BUFFER_FILE
    if not buffer.is_file():
        print(f"{out}: nothing to upload (no {BUFFER_FILE})")
        return 0
    recorded = json.loads((out / TRACKING_FILE).read_text()) if (out / TRACKING_FILE).is_file() else {}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or recorded.get("uri")
    run_id = recorded.get("run_id") or (out / RUN_ID_FILE).read_text().strip()
    if not uri or "***" in uri:
        print(f"{out}: set MLFLOW_TRACKING_URI to the run's server", file=sys.stderr)
        return 2
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, v)
    try:
        probe(uri)
    except TrackingUnreachable as e:
        print(f"sync: {e}", file=sys.stderr)
        return 1
    import mlflow
    n = sum(1 for _ in buffer.open())
    if not replay(mlflow.MlflowClient(uri), run_id, buffer):
        left = sum(1 for _ in buffer.open())
        print(f"sync: {n - left} of {n} records uploaded to run {run_id}; {left} left in {buffer}",
              file=sys.stderr)
        return 1
    print(f"sync: {n} records uploaded to run {run_id} at {redact(uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m delo_dist.tracking",
                                description="MLflow upkeep for delo-dist output folders")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="upload records buffered while the server was unreachable")
    s.add_argument("output_dir")
    a = p.parse_args(argv)
    return sync(Path(a.output_dir))


if __name__ == "__main__":
    sys.exit(main())
