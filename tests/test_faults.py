"""Faults a user meets, each ending in one last line, a documented exit status (train.py) and
nothing lost or rewritten: a diverging run (NaN/inf, stop and skip), damaged checkpoints (an
altered tensor, a cut tensor file, a cut JSON), a full disk (a real tmpfs when this machine
lets root mount one), a tracking server lost between the probe and the run's lookup,
exponent floats, a command-line typo, a manifest that contradicts itself, a foreign folder.

The trainer runs in this process through `delo_dist.train.main` (its real entry point, the
launcher aside); the launcher itself is `test_the_trainers_line_is_the_last_a_user_sees`."""
from __future__ import annotations

import contextlib
import errno
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from delo_dist.config import load_recipe
from delo_dist.train import main as train_main
from delo_dist.training import checkpoint
from delo_dist.training.checkpoint import CheckpointError
from delo_dist.training.stopping import STOP_SIGNALS
from tests.conftest import REPO, tiny_overrides
from tests.test_distributed import free_port
from tests.test_resume import COMPARED

RECIPE = str(REPO / "recipes" / "quickstart.yaml")
TWO = {"data.sessions": 2, "train.log_every": 3}     # the runs whose checkpoints get damaged


def train(shards: Path, out: Path, capfd, **extra) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one job on the tiny recipe."""
    capfd.readouterr()
    status = train_main([RECIPE, *tiny_overrides(shards, out, **extra)])
    stdout, stderr = capfd.readouterr()
    return status, stdout, stderr


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def strict_json(path: Path):
    def refuse(word):
        raise AssertionError(f"{path}: bare {word} (not JSON)")
    return json.loads(path.read_text(), parse_constant=refuse)


def mlflow_run(out: Path):
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    return mlflow.MlflowClient(uri).get_run((out / "mlflow_run_id").read_text().strip())


# ---------------------------------------------------------------- what a person types
def test_exponent_floats_in_a_recipe_and_on_the_command_line(tmp_path, shards):
    p = tmp_path / "r.yaml"
    p.write_text(f"data:\n  shards: {shards}\ntrain:\n  lr: 1e-3\n  eps: 1e-8\n  weight_decay: 5E-2\n")
    r = load_recipe(p, ["method.delo.lambda_align=1e-1", "train.warmup_ratio=2.5e-1"])
    assert (r.train.lr, r.train.eps, r.train.weight_decay) == (1e-3, 1e-8, 5e-2)
    assert (r.method.settings.lambda_align, r.train.warmup_ratio) == (0.1, 0.25)
    assert load_recipe(RECIPE, [f"data.shards={shards}", "train.lr=1e-4"]).train.lr == 1e-4
    assert load_recipe(p, ["tracking.run_name=e4"]).tracking.run_name == "e4"   # still a word


def test_a_command_line_typo_is_blamed_on_the_command_line(shards, tmp_path, capfd):
    status, _, err = train(shards, tmp_path / "run", capfd, **{"trian.epochs": 3})
    assert status == 2
    assert last_line(err).startswith("recipe error: command line: override 'trian.epochs=3': "
                                     "unknown key 'trian'; expected one of")
    assert not (tmp_path / "run").exists()


def test_an_inconsistent_manifest_stops_before_training(shards, tmp_path, capfd):
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sessions"][1]["splits"]["train"]["count"] += 1   # 65; its files hold 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    before = files(root)
    status, _, err = train(root, tmp_path / "run", capfd)
    assert status == 2
    line = last_line(err)
    assert line.startswith(f"data error: {root / 'manifest.json'} contradicts itself")
    assert "session 1 train: count 65, but its files hold 64 samples" in line
    assert "session 1 train: count 65, but 64 sample keys listed" in line
    assert files(root) == before
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "mlflow_run_id").exists()


def test_a_foreign_folder_is_refused_in_one_message(tmp_path, capfd):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    status, out, err = train(foreign, tmp_path / "run", capfd, **{"data.make_synthetic": "true"})
    assert status == 2
    assert last_line(err).startswith(f"launch error: {foreign}: not empty and not a synthetic benchmark")
    assert "synthetic benchmark there" not in out + err      # no "making it" before the refusal
    assert files(foreign) == {"notes.txt": b"precious"}


# ---------------------------------------------------------------- tracking
@contextlib.contextmanager
def server_lost_after_probes():
    """An HTTP server that answers MLflow's probe (experiments/search) and dies at the first
    other request (the run's experiment lookup): a server lost between probe and lookup."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/api/2.0/mlflow/experiments/search"):
                body = b'{"experiments": []}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.close_connection = True          # no answer, then nobody listening
            threading.Thread(target=lambda: (server.shutdown(), server.server_close())).start()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        with contextlib.suppress(OSError):
            server.shutdown()
            server.server_close()


def test_a_server_lost_between_probe_and_lookup_is_one_line(shards, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # the job's own limits allow 2
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with server_lost_after_probes() as uri:
        status, _, err = train(shards, tmp_path / "run", capfd, **{"tracking.uri": uri})
    assert status == 2
    assert last_line(err).startswith(f"tracking error: MLflow tracking server {uri} failed while "
                                     "the job opened its run (MlflowException: ")
    assert "unset MLFLOW_TRACKING_URI" in last_line(err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "run"
    assert not (out / "checkpoints").exists() and not (out / ".lock").exists()


# ---------------------------------------------------------------- a diverging run
@pytest.mark.slow
def test_a_nan_stops_the_run_and_leaves_the_last_good_checkpoint(shards, tmp_path, capfd):
    out = tmp_path / "run"
    extra = {**TWO, "train.lr": "1e6", "train.checkpoint_every": 1}
    status, stdout, err = train(shards, out, capfd, **extra)
    assert status == 3, err[-2000:]
    line = last_line(err)
    assert line.startswith("training diverged: non-finite ")
    assert "at session 0 epoch 1/1 step 2/8 (train.nonfinite=stop)" in line
    good = out / "checkpoints" / "latest_step"
    assert f"last good checkpoint {good} (latest_step, session 0 epoch 1 step 1)" in line
    assert "python -m delo_dist.train " in line and "train.nonfinite=skip" in line
    checkpoint.verify(good)
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "model.safetensors")).values())
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()
    run = mlflow_run(out)
    assert run.info.status == "FAILED" and "final_ap" not in run.data.metrics
    assert run.info.run_name == "quickstart: delo vilt-tiny both eta=0.7 seed=0"
    assert "Creating initial MLflow database tables" not in stdout + err   # the store's first use

    kept = files(out / "checkpoints")
    again, _, err = train(shards, out, capfd, **extra)   # resumes from it, diverges again
    assert again == 3 and last_line(err) == line
    assert files(out / "checkpoints") == kept


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_limited(shards, tmp_path, capfd):
    out = tmp_path / "run"
    extra = {"data.sessions": 1, "train.lr": "1e6", "train.nonfinite": "skip",
             "eval.oracle": "false"}
    status, stdout, err = train(shards, out, capfd, **extra, **{"train.max_nonfinite_steps": 3})
    assert status == 3
    skipped = [ln for ln in stdout.splitlines() if "step skipped, no update applied" in ln]
    assert len(skipped) == 3
    first = int(skipped[0].split(" step ")[1].split("/")[0])   # steps before it were applied
    assert [f"step {first + i}/8: non-finite " in ln for i, ln in enumerate(skipped)] == [True] * 3
    assert f"at session 0 epoch 1/1 step {first + 3}/8 (4 skipped steps this session, more than " \
           "train.max_nonfinite_steps=3)" in last_line(err)
    assert not (out / "metrics.json").exists()

    # the limit is result-neutral: the same folder goes on with a higher one (from the start:
    # no checkpoint was written) and reports what it dropped
    status, stdout, err = train(shards, out, capfd, **extra, **{"train.max_nonfinite_steps": 100})
    assert status == 0, err[-2000:]
    m = strict_json(out / "metrics.json")
    n = 8 - (first - 1)   # every step from the first non-finite one: the weights stay where they were
    assert m["nonfinite_steps"] == m["sessions"][0]["nonfinite_steps"] == n and m["nonfinite"] == "skip"
    assert m["oracle_matrix"] == [[None]] and m["oracle_ap"] is None   # NaN (no oracle) as null
    assert f"{n} non-finite steps skipped" in stdout
    assert mlflow_run(out).data.metrics["nonfinite_steps"] == n


# ---------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def two_runs(shards, tmp_path_factory):
    """The same 2-session job straight, and stopped by SIGTERM in session 1 (checkpoints
    session_00 and latest_step), with their MLflow store."""
    root = tmp_path_factory.mktemp("damage")
    assert train_main([RECIPE, *tiny_overrides(shards, root / "straight", **TWO)]) == 0
    out = root / "stopped"
    first = out / "checkpoints" / "session_00" / "state.json"

    def stop_in_session_1():
        deadline = time.time() + 300
        while not first.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)     # what a scheduler sends before preemption

    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    watcher = threading.Thread(target=stop_in_session_1, daemon=True)
    watcher.start()
    try:
        assert train_main([RECIPE, *tiny_overrides(shards, out, **TWO)]) == 75
    finally:
        watcher.join()
        for s, h in handlers.items():
            signal.signal(s, h)
        # the jobs exported their store's URI (mlflow.set_tracking_uri): a module fixture runs
        # before conftest's per-test reset, which would keep it for every test of the module
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_tracking_uri(None)
    assert (out / "checkpoints" / "latest").read_text() == "latest_step"
    return root


def copy_of(two_runs: Path, tmp_path: Path) -> Path:
    """The stopped run (and the MLflow store its run lives in) under tmp_path/run."""
    shutil.copytree(two_runs / "stopped", tmp_path / "run")
    shutil.copy(two_runs / "mlflow.db", tmp_path / "mlflow.db")
    return tmp_path / "run"


def same_results(a: Path, b: Path) -> None:
    x, y = strict_json(a / "metrics.json"), strict_json(b / "metrics.json")
    for key in COMPARED:
        assert x[key] == y[key], key
    assert [s["train_loss"] for s in x["sessions"]] == [s["train_loss"] for s in y["sessions"]]


@pytest.mark.slow
def test_checkpoints_carry_their_integrity_and_runs_their_outputs(two_runs):
    straight = two_runs / "straight"
    for tag in ("session_00", "session_01"):
        ckpt = straight / "checkpoints" / tag
        checkpoint.verify(ckpt)
        records = json.loads((ckpt / checkpoint.INTEGRITY).read_text())["files"]
        assert set(records) == {p.name for p in ckpt.iterdir()} - {checkpoint.INTEGRITY}
        assert {oct(p.stat().st_mode & 0o777) for p in ckpt.iterdir()} == {oct(0o666 & ~_umask())}
    assert not (straight / ".lock").exists()                  # a clean finish leaves no lock
    m = strict_json(straight / "metrics.json")
    assert m["resumes"] == 0 and m["nonfinite_steps"] == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_an_altered_tensor_is_refused_and_an_earlier_checkpoint_resumes_exactly(
        two_runs, shards, tmp_path, capfd):
    out = copy_of(two_runs, tmp_path)
    damaged = out / "checkpoints" / "latest_step" / "model.safetensors"
    tensors = load_file(str(damaged))
    name = next(n for n in sorted(tensors) if ".sessions.1." in n)   # an adapter session 1 trains
    tensors[name] = torch.zeros_like(tensors[name])
    size = damaged.stat().st_size
    save_file(tensors, str(damaged))
    assert damaged.stat().st_size == size                       # readable, same size, other numbers
    before, status_before = files(out), mlflow_run(out).info.status

    status, _, err = train(shards, out, capfd, **TWO)
    assert status == 2
    line = last_line(err)
    assert line.startswith(f"checkpoint error: {damaged}: sha256 ")
    assert "(same size, other bytes: altered since it was written)" in line
    earlier = out / "checkpoints" / "session_00"
    assert f"the newest earlier checkpoint that verifies is {earlier} (session_00, after session 0)" in line
    assert f"train.resume_from={earlier}`" in line
    assert files(out) == before and mlflow_run(out).info.status == status_before   # nothing touched

    first_attempt = json.loads((earlier / "state.json").read_text())["wall_time_s"]
    t0 = time.time()
    status, stdout, err = train(shards, out, capfd, **TWO, **{"train.resume_from": earlier})
    took = time.time() - t0
    assert status == 0, err[-2000:]
    assert f"resuming from {earlier} (session_00, after session 0; resume 1)" in stdout
    same_results(two_runs / "straight", out)
    m = strict_json(out / "metrics.json")
    # the first attempt's time (to its checkpoint) counts, beside at most this attempt's own
    assert m["resumes"] == 1 and first_attempt < m["wall_time_s"] <= first_attempt + took
    assert mlflow_run(out).info.status == "FINISHED"
    # loss lines count optimizer steps within the epoch: every 3rd and the epoch's last
    assert [ln.split(" loss")[0] for ln in stdout.splitlines() if " loss " in ln and ln.startswith("session 1 ")] \
        == ["session 1 epoch 1/1 step 3/8", "session 1 epoch 1/1 step 6/8", "session 1 epoch 1/1 step 8/8"]


@pytest.mark.slow
def test_a_truncated_tensor_file_falls_back_when_the_recipe_says_so(two_runs, shards, tmp_path, capfd):
    out = copy_of(two_runs, tmp_path)
    cut = out / "checkpoints" / "latest_step" / "engine-rank0.safetensors"
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{cut}: {len(data) // 2} bytes, expected {len(data)}"):
        checkpoint.verify(cut.parent)
    status, stdout, err = train(shards, out, capfd, **TWO, **{"train.damaged_checkpoint": "fall_back",
                                                              "train.keep_checkpoints": 0})
    assert status == 0, err[-2000:]
    assert f"{cut}: {len(data) // 2} bytes, expected {len(data)}" in stdout
    assert "resuming from the newest earlier checkpoint that verifies" in stdout
    same_results(two_runs / "straight", out)
    # keep_checkpoints=0: only the latest is left (the damaged mid-session one went with it)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "session_01"]


@pytest.mark.slow
def test_a_truncated_json_is_refused_naming_the_file(two_runs, shards, tmp_path, capfd):
    out = copy_of(two_runs, tmp_path)
    state = out / "checkpoints" / "latest_step" / "state.json"
    text = state.read_text()
    state.write_text(text[:len(text) // 3])
    before = files(out)
    status, _, err = train(shards, out, capfd, **TWO)
    assert status == 2
    line = last_line(err)
    assert line.startswith(f"checkpoint error: {state}: {len(text) // 3} bytes, expected {len(text)}")
    assert "train.resume_from=" in line and files(out) == before


@pytest.mark.slow
def test_evaluating_a_damaged_checkpoint_names_an_earlier_one(two_runs, shards, tmp_path, capfd):
    out = copy_of(two_runs, tmp_path)
    target = out / "checkpoints" / "latest_step"
    (target / "rng-rank0.safetensors").write_bytes(b"\0" * (target / "rng-rank0.safetensors").stat().st_size)
    status, _, err = train(shards, tmp_path / "eval", capfd, **TWO, **{"eval.checkpoint": target})
    assert status == 2
    line = last_line(err)
    assert line.startswith(f"checkpoint error: {target / 'rng-rank0.safetensors'}: sha256 ")
    assert f"eval.checkpoint={out / 'checkpoints' / 'session_00'}`" in line
    assert not (tmp_path / "eval" / "eval.json").exists()
    # a checkpoint from before integrity records: what cannot be read is still named
    (target / checkpoint.INTEGRITY).unlink()
    model = target / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{model}: unreadable .*predates integrity records"):
        checkpoint.verify(target)


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root and mount(8) needed), or None where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                              capture_output=True, text=True)
    except OSError:   # no mount(8)
        done = None
    if done is None or done.returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a file until the disk is full, then free `leave` bytes of it."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    with open(filler, "r+b") as f:
        f.truncate(max(filler.stat().st_size - leave, 0))
    return filler


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_the_relaunch_is_exact(two_runs, shards, tmp_path, capfd,
                                                               small_disk, monkeypatch):
    root = small_disk or tmp_path / "no-tmpfs"
    out = root / "run"
    extra = {**TWO, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = out / "checkpoints" / "latest"
    if small_disk is not None:   # a real full disk: filled once session 0's checkpoint is in
        def fill_after_session_0():
            while not first.exists():
                time.sleep(0.02)
            fill(small_disk, leave=64 * 1024)   # small files still fit, a checkpoint does not
        filler = threading.Thread(target=fill_after_session_0, daemon=True)
        filler.start()
    else:                        # stand-in where tmpfs cannot be mounted: the writer fails
        real = checkpoint._write

        def full(path, data):
            if "session_01" in str(path) and len(data) > 64 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, data)
        monkeypatch.setattr(checkpoint, "_write", full)
    status, _, err = train(shards, out, capfd, **extra)
    assert status == 74, err[-2000:]
    line = last_line(err)
    assert line.startswith(f"write error: could not write {out / 'checkpoints' / 'session_01.tmp'}/")
    assert "No space left on device" in line and " free on its file system)" in line
    assert f"the previous checkpoint {out / 'checkpoints' / 'session_00'} is in force" in line
    assert not list(out.rglob("*.tmp")) and (first.read_text() == "session_00")
    checkpoint.verify(out / "checkpoints" / "session_00")
    assert not (out / "metrics.json").exists()
    run = mlflow.MlflowClient(extra["tracking.uri"]).get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"

    if small_disk is not None:
        (small_disk / "filler").unlink()
    else:
        monkeypatch.undo()
    status, _, err = train(shards, out, capfd, **extra)   # room again: the same command
    assert status == 0, err[-2000:]
    same_results(two_runs / "straight", out)


@pytest.mark.slow
@pytest.mark.parametrize("stage, policy", [(2, "stop"), (0, "skip")])
def test_two_ranks_agree_on_a_nan_step(shards, tmp_path, stage, policy):
    """2 processes, DeepSpeed over gloo: ZeRO-2 drops a non-finite step itself, stage 0 by
    our hand; either way both ranks agree to stop, or to skip and count."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "delo_dist.launch", "--config_file", "accelerate_configs/cpu_2proc_zero2.yaml",
         "--main_process_port", str(free_port()), "delo_dist/train.py", RECIPE,
         *tiny_overrides(shards, out, **{"data.sessions": 1, "train.batch_size": 4, "train.lr": "1e6",
                                         "distributed.zero_stage": stage, "train.nonfinite": policy,
                                         "train.max_nonfinite_steps": 100})],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    if policy == "stop":
        assert done.returncode == 3, done.stderr[-3000:]
        assert last_line(done.stderr).startswith("training diverged: non-finite ")
        assert not (out / "metrics.json").exists()
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        m = strict_json(out / "metrics.json")
        assert m["world_size"] == 2 and m["nonfinite_steps"] > 0
        assert done.stdout.count("step skipped, no update applied") == m["nonfinite_steps"]


# ---------------------------------------------------------------- what a user sees
@pytest.mark.slow
@pytest.mark.parametrize("config", ["default.yaml", "cpu_2proc_zero2.yaml"])
def test_the_trainers_line_is_the_last_a_user_sees(shards, tmp_path, config):
    args = ["--config_file", f"accelerate_configs/{config}", "--main_process_port", str(free_port()),
            "delo_dist/train.py", RECIPE,
            *tiny_overrides(shards, tmp_path / "run"), "trian.epochs=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(["accelerate", "launch", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    expected = "recipe error: command line: override 'trian.epochs=3': unknown key 'trian'"
    assert plain.returncode == 1 and expected in plain.stderr      # then accelerate's traceback
    wrapped = subprocess.run([sys.executable, "-m", "delo_dist.launch", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert wrapped.returncode == 2, wrapped.stderr[-3000:]
    assert last_line(wrapped.stderr).startswith(expected) and "Traceback" not in wrapped.stderr
    assert wrapped.stderr.count(expected) >= 2          # the trainer's rank(s), then the wrapper


# ---------------------------------------------------------------- small parts
def test_keep_checkpoints_keeps_the_latest_and_the_newest_others(tmp_path):
    root = tmp_path / "checkpoints"
    for tag in ("session_00", "session_01", "session_02", "latest_step"):
        (root / tag).mkdir(parents=True)
        (root / tag / "state.json").write_text("{}")
    (root / "latest").write_text("session_02")
    assert checkpoint.prune(tmp_path, None) == []
    checkpoint.prune(tmp_path, 1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "session_01", "session_02"]
    checkpoint.prune(tmp_path, 0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "session_02"]


def test_a_resume_hint_replaces_the_key_it_sets():
    from delo_dist.training import stopping
    stopping.set_job_args(["recipes/quickstart.yaml", "train.resume_from=a", "seed=1"])
    cmd = stopping.launch_command("train.resume_from=b")
    assert cmd.endswith("recipes/quickstart.yaml seed=1 train.resume_from=b")
    assert "train.resume_from=a" not in cmd


def test_nonfinite_values_never_reach_metrics_json():
    from delo_dist.training.results import _strict
    tree = {"a": [1.0, math.nan, {"b": math.inf}], "c": "nan", "d": 2}
    assert json.dumps(_strict(tree), allow_nan=False) == '{"a": [1.0, null, {"b": null}], "c": "nan", "d": 2}'
