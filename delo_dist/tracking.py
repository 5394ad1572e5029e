"""MLflow logging from the main process only, one run per training job.

The run id is written beside the checkpoints (`<output_dir>/mlflow_run_id`): a resumed job
logs into the same run instead of opening a second one. Every exit path sets a status:
FINISHED, FAILED on an exception, KILLED when preempted (the resumed job sets it RUNNING).
Default store: sqlite in the output root (the output dir's parent), unless
MLFLOW_TRACKING_URI is set or the recipe names one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from pathlib import Path

from delo_dist.config import Recipe, flatten, to_dict

RUN_ID_FILE = "mlflow_run_id"


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


class Tracker:
    def __init__(self, recipe: Recipe, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow
        self.mlflow = mlflow
        out = Path(recipe.output_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.uri or default_uri(out)
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        id_file = out / RUN_ID_FILE
        with _store_lock(uri):
            experiment_id = _experiment(mlflow, recipe.tracking.experiment, uri)
            if id_file.is_file():  # resume the run this output dir already has
                self.run_id = id_file.read_text().strip()
                mlflow.start_run(run_id=self.run_id)
                return
            run = mlflow.start_run(experiment_id=experiment_id,
                                   run_name=recipe.tracking.run_name or recipe.name)
        self.run_id = run.info.run_id
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(self.run_id)
        os.replace(tmp, id_file)
        params = {k: str(v)[:500] for k, v in flatten(to_dict(recipe)).items()}
        mlflow.log_params(params)
        d, m = recipe.data, recipe.method
        tags = {
            "dataset": d.dataset, "method": m.name, "backbone": recipe.backbone.pretrained or
            f"{recipe.backbone.name}-tiny", "eta": str(d.eta), "missing_type": d.missing_type,
            "both_ratio": str(d.both_ratio), "seed": str(recipe.seed), "git_commit": git_commit(),
            "output_dir": str(out.resolve()),
        }
        for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
            if os.environ.get(var):
                tags[var.lower()] = os.environ[var]
        tags.update({k: str(v) for k, v in recipe.tracking.tags.items()})
        mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        if self.enabled and Path(path).exists():
            self.mlflow.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
