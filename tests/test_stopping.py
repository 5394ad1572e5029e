"""SIGTERM to the `accelerate launch` process (what `timeout`, a shell or a scheduler without
srun sends): no trainer outlives it, a checkpoint and the PREEMPTED marker are written, and
the relaunch ends with the metrics of a run never interrupted. Real launchers, real signals:
the 1-process launcher (which neither forwards nor survives SIGTERM: the parent-death signal
does it) and the 2-process DeepSpeed launcher (torch.distributed.run forwards it)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO, tiny_overrides
from tests.test_distributed import free_port
from tests.test_resume import COMPARED
from tests.helpers import job_env

pytestmark = pytest.mark.slow


def launcher(config: str, overrides: list[str]) -> list[str]:
    return ["accelerate", "launch", "--config_file", f"accelerate_configs/{config}",
            "--main_process_port", str(free_port()), "delo_dist/train.py", "recipes/quickstart.yaml",
            *overrides]


def term_the_launcher_mid_session(cmd: list[str], out, trainers: int):
    out.mkdir(parents=True)
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=log_file, stderr=subprocess.STDOUT)
    marker = out / "checkpoints" / "session_00" / "state.json"
    deadline = time.time() + 900
    while not marker.exists():                       # session 1 is training now
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)
    children = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "delo_dist/train.py" in " ".join(c.cmdline())]
    assert len(children) == trainers
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    gone, alive = psutil.wait_procs(children, timeout=180)
    log = log_path.read_text()
    assert not alive, f"orphaned trainers: {[p.pid for p in alive]}\n{log[-3000:]}"
    return log


def test_sigterm_to_the_one_process_launcher(shards, tmp_path):
    extra = {"data.sessions": 2, "train.epochs": 6, "tracking.experiment": "stopping"}
    straight = tmp_path / "straight"
    done = subprocess.run(launcher("default.yaml", tiny_overrides(shards, straight, **extra)),
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "values were not passed" not in done.stderr

    out = tmp_path / "killed"
    cmd = launcher("default.yaml", tiny_overrides(shards, out, **extra))
    log = term_the_launcher_mid_session(cmd, out, trainers=1)
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["checkpoint"].endswith("checkpoints/latest_step")
    # the hint is the launch as typed: without --config_file accelerate would guess and warn
    assert marker["resume"].startswith("accelerate launch --config_file accelerate_configs/default.yaml "
                                       "--main_process_port ")
    state = json.loads((out / "checkpoints" / "latest_step" / "state.json").read_text())
    assert state["session"] == 1 and state["mid_session"]
    assert "preempted: checkpoint" in log and "resume by relaunching the same command" in log

    again = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and not (out / "PREEMPTED").exists()
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in COMPARED:
        assert a[key] == b[key], key
    assert [s["train_loss"] for s in a["sessions"]] == [s["train_loss"] for s in b["sessions"]]


def test_sigterm_to_the_two_process_deepspeed_launcher(shards, tmp_path):
    out = tmp_path / "killed"
    overrides = tiny_overrides(shards, out, **{"data.sessions": 2, "train.epochs": 3})
    term_the_launcher_mid_session(launcher("cpu_2proc_zero2.yaml", overrides), out, trainers=2)
    assert (out / "PREEMPTED").is_file()
    state = json.loads((out / "checkpoints" / "latest_step" / "state.json").read_text())
    assert state["session"] == 1 and state["mid_session"]
    assert sorted(p.name for p in (out / "checkpoints" / "latest_step").glob("engine-rank*.json")) == \
        ["engine-rank0.json", "engine-rank1.json"]
