"""slurm/sweep.sbatch on a real single-node Slurm cluster (slurm/local_cluster.sh installs and
starts it) against a real MLflow server: an array over a grid, and a requeue after USR1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from test_compare import mlflow_server

EXPERIMENT = "slurm-test"


SKIPPED = 77   # local_cluster.sh: cannot install or start here (not root, no apt, no mirror)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Install (apt) and start a fresh cluster: one an earlier run left up is restarted with
    no job, job id or queue from then. Skips, with the reason, where Slurm cannot be
    installed (no root, no apt-get or mirror); fails when a started cluster does not come up."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (apt-get, slurmctld, slurmd): "
                    "run as root, or `sudo slurm/local_cluster.sh` first")
    t0 = time.time()
    done = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "fresh"],
                          capture_output=True, text=True, timeout=900)
    if done.returncode == SKIPPED:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"slurm/local_cluster.sh failed:\n{done.stdout}\n{done.stderr}"
    print(f"{done.stdout.strip()} ({time.time() - t0:.1f} s)")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    from mlflow.tracking import MlflowClient
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        # Made up front: in mlflow 3.17, tasks racing to create it inside set_experiment leave
        # the loser's run in the Default experiment (see the report on tracking.py).
        MlflowClient(uri).create_experiment(EXPERIMENT)
        yield uri


def submit(grid: list[str], shards: Path, root: Path, uri: str, **extra) -> str:
    """sbatch the sweep over `grid` (one array task per setting); returns the array job id."""
    overrides = [o for o in tiny_overrides(shards, root / "unused",
                                           **{"tracking.experiment": EXPERIMENT, **extra})
                 if not o.startswith("output_dir=")]   # the script names each task's folder
    args = ["slurm/sweep.sbatch", "recipes/quickstart.yaml", *overrides, *grid]
    n = int(subprocess.run(["bash", "slurm/sweep.sbatch", "--count", *args[1:]], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OUT_ROOT": str(root), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["sbatch", "--parsable", f"--array=0-{n - 1}", "--cpus-per-task=1",
                           f"--output={root}/slurm-%A_%a.out", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait_for(job: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"array job {job} still queued after {timeout} s")
        time.sleep(2)


def task_runs(uri: str, job: str) -> dict[int, list]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs: dict[int, list] = {}
    for r in client.search_runs([exp], f"tags.slurm_array_job_id = '{job}'"):
        runs.setdefault(int(r.data.tags["slurm_array_task_id"]), []).append(r)
    return runs


def scontrol_job(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def logs(root: Path, job: str, task: int) -> str:
    return (root / f"slurm-{job}_{task}.out").read_text(errors="replace")


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_grid_maps_array_indices_to_overrides():
    grid = ["recipes/quickstart.yaml", "train.epochs=1", "data.eta=0.1,0.5", "data.missing_type=text,image,both",
            "tracking.tags={a: 1, b: 2}", "method.name=delo"]
    run = lambda *a, **env: subprocess.run(["bash", "slurm/sweep.sbatch", *a], cwd=REPO, text=True,  # noqa: E731
                                           capture_output=True, env={**os.environ, **env})
    assert run("--count", *grid).stdout == "6\n"
    lines = run("--list", *grid).stdout.splitlines()
    assert lines[0] == "0: data.eta=0.1 data.missing_type=text"
    assert lines[5] == "5: data.eta=0.5 data.missing_type=both"
    outside = run(*grid, SLURM_ARRAY_TASK_ID="6", SLURM_ARRAY_JOB_ID="1")
    assert outside.returncode == 2 and "use --array=0-5" in outside.stderr


@pytest.mark.slow
def test_array_sweep_logs_one_finished_run_per_setting(slurm_cluster, tracking, shards, tmp_path):
    etas = ["0.1", "0.5", "0.9"]
    job = submit([f"data.eta={','.join(etas)}"], shards, tmp_path, tracking, **{"data.missing_type": "both"})
    wait_for(job)
    runs = task_runs(tracking, job)
    assert sorted(runs) == [0, 1, 2], (runs, {t: logs(tmp_path, job, t)[-3000:] for t in range(3)})
    for task, eta in enumerate(etas):
        assert len(runs[task]) == 1, f"task {task}: {len(runs[task])} MLflow runs"
        run = runs[task][0]
        t = run.data.tags
        assert run.info.status == "FINISHED", logs(tmp_path, job, task)[-3000:]
        out = tmp_path / f"{job}_{task}-{eta}"
        assert t["output_dir"] == str(out.resolve())
        assert (t["eta"], t["missing_type"], t["both_ratio"], t["method"], t["dataset"], t["seed"]) == \
            (eta, "both", "0.5", "delo", "synthetic", "0")
        assert t["slurm_array_job_id"] == job and t["slurm_job_id"] and t["git_commit"]
        assert "backbone" in t
        final = json.loads((out / "metrics.json").read_text())
        assert run.data.metrics["final_ap"] == pytest.approx(final["ap"])
        assert run.data.metrics["final_fg"] == pytest.approx(final["fg"])


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_the_same_run(slurm_cluster, tracking, shards, tmp_path):
    # Task 0 is quick; task 1 trains long enough to be interrupted.
    job = submit(["train.epochs=1,30"], shards, tmp_path, tracking)
    log1 = tmp_path / f"slurm-{job}_1.out"
    deadline = time.time() + 600
    while "session 0 epoch 2/" not in (log1.read_text(errors="replace") if log1.exists() else ""):
        assert time.time() < deadline, "task 1 never started training"
        time.sleep(1)
    # What Slurm does before the time limit with --signal=B:USR1@N: signal the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_1"], check=True)
    # Slurm makes a requeued job eligible 120 s later; start it now to keep the test short.
    while "requeueing" not in log1.read_text(errors="replace"):
        assert time.time() < deadline, "task 1 was not requeued:\n" + log1.read_text(errors="replace")[-3000:]
        time.sleep(1)
    while "Reason=BeginTime" not in scontrol_job(f"{job}_1"):
        assert time.time() < deadline, scontrol_job(f"{job}_1")
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job}_1", "starttime=now"], check=True)
    wait_for(job)

    text = logs(tmp_path, job, 1)
    assert "USR1: asking the trainer" in text, "the batch shell did not forward the signal"
    assert "requeueing" in text and "resuming from" in text, text[-4000:]
    assert text.count("restart 1:") == 1 and "restart 2:" not in text
    runs = task_runs(tracking, job)
    assert [len(runs[0]), len(runs[1])] == [1, 1], "a requeued task must resume its MLflow run"
    for task in (0, 1):
        assert runs[task][0].info.status == "FINISHED", logs(tmp_path, job, task)[-3000:]
        assert (tmp_path / f"{job}_{task}-{task and 30 or 1}" / "metrics.json").is_file()
    # Each session evaluated exactly once across the two launches: no work lost or repeated.
    from mlflow.tracking import MlflowClient
    history = MlflowClient(tracking).get_metric_history(runs[1][0].info.run_id, "ap")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert "requeueing" not in logs(tmp_path, job, 0) and "restart 1:" not in logs(tmp_path, job, 0)
