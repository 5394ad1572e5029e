"""Stopping cleanly, whoever is asked to stop.

- STOP_SIGNALS: SIGTERM (timeout, a shell, a scheduler), SIGUSR1 (Slurm's warning before a
  time limit) and SIGINT (Ctrl-C, `kill -INT`) all mean: checkpoint after this step, exit.
- `die_with_parent`: accelerate's one-process launcher neither forwards SIGTERM nor survives
  it, and a launcher killed outright leaves its trainers behind. Linux's parent-death signal
  makes the kernel send SIGTERM to the trainer when its parent (the launcher, or torchrun's
  agent) dies, so the trainer checkpoints and exits instead of running on as an orphan.
- `launch_command`: how to run this job again, read from the launcher that started it (so a
  resume hint keeps `--config_file`, without which accelerate warns about guessed values).
- The PREEMPTED marker: `<output_dir>/PREEMPTED` (JSON: checkpoint, how to resume) is what
  scripts test, since the exit code a launcher reports for its trainers varies (75, 1, 143).
  It is removed when the job resumes or finishes.
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from delo_dist.data.files import atomic_write_text

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MARKER = "PREEMPTED"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` when the parent process dies (Linux only; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:   # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


_job_args: list[str] | None = None   # the trainer's arguments (train.main records them)
_prefix: list[str] | None = None     # and its launcher, read at start: a dead one cannot be


def set_job_args(args: list[str]) -> None:
    global _job_args, _prefix
    _job_args, _prefix = list(args), _launcher()


def launch_command(*extra: str) -> str:
    """The command that started this job, as its user would type it again, `extra` overrides
    replacing earlier values of their keys: the launcher with every option it was given
    (`accelerate launch --config_file ...`, or `python -m delo_dist.launch ...`) when it is
    this trainer's parent process, else the way this Python was started."""
    args = list(_job_args if _job_args is not None else sys.argv[1:])
    for item in extra:
        key = item.split("=", 1)[0] + "="
        args = [a for a in args if not a.startswith(key)] + [item]
    return shlex.join((_prefix if _prefix is not None else _launcher()) + args)


def _launcher() -> list[str]:
    """Everything before the recipe: launcher, its options and the script."""
    script = sys.argv[0]
    try:
        import psutil
        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 - no parent to read: describe this process
        parent = []
    for i, word in enumerate(parent):
        name = os.path.basename(word)
        if name == "accelerate-launch" or (name == "accelerate" and parent[i + 1:i + 2] == ["launch"]):
            start = [_short(word), *(["launch"] if name == "accelerate" else [])]
            rest = parent[i + len(start):]
        elif word == "-m" and parent[i + 1:i + 2] == ["delo_dist.launch"]:
            start, rest = ["python", "-m", "delo_dist.launch"], parent[i + 2:]
        else:
            continue
        if script in rest:   # the launcher's own options end at this trainer's script
            return start + rest[:rest.index(script) + 1]
    own = getattr(sys, "orig_argv", [])
    if script.endswith("train.py") and "-m" not in own:
        return ["python", script]
    return ["python", "-m", "delo_dist.train"]


def _short(path: str) -> str:
    """A program by its name when that is what the shell would run, else its path."""
    import shutil
    name = os.path.basename(path)
    found = shutil.which(name)
    return name if found and os.path.realpath(found) == os.path.realpath(path) else path


def mark_preempted(out: Path, checkpoint: Path) -> str:
    """Write the marker; return the one line to print."""
    info = {"checkpoint": str(checkpoint), "resume": launch_command(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    atomic_write_text(Path(out) / MARKER, json.dumps(info, indent=1))
    return (f"preempted: checkpoint {checkpoint}; resume by relaunching the same command "
            f"({info['resume']}); marker {Path(out) / MARKER}")


def clear_marker(out: Path) -> None:
    (Path(out) / MARKER).unlink(missing_ok=True)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm under train.nonfinite=stop (or past its skip limit)."""


def nonfinite_step(train, what: str, where: str, count: int, out: Path, engine, main: bool) -> None:
    """A step whose loss or gradient norm was not finite (`what`; its update was not applied),
    the session's `count`-th: go on (train.nonfinite=skip, up to train.max_nonfinite_steps) or
    raise TrainingDiverged with how to resume from the last good checkpoint (left intact)."""
    from delo_dist.training import checkpoint
    if train.nonfinite == "skip" and count <= train.max_nonfinite_steps:
        if main:
            print(f"{where}: non-finite {what}: step skipped, no update applied ({count} of at "
                  f"most {train.max_nonfinite_steps} this session, train.max_nonfinite_steps)",
                  flush=True)
        return
    engine.destroy()
    why = ("train.nonfinite=stop" if train.nonfinite == "stop" else
           f"{count} skipped steps this session, more than "
           f"train.max_nonfinite_steps={train.max_nonfinite_steps}")
    good = checkpoint.latest(out)
    if good is None:
        resume = "no checkpoint was written before it: relaunching starts from the beginning"
    else:
        resume = (f"nothing was saved after the last good checkpoint {good} "
                  f"({checkpoint.describe(good)}), which relaunching resumes from: "
                  f"`{launch_command()}`")
    skip = "" if train.nonfinite == "skip" else "; add train.nonfinite=skip to drop such steps and go on"
    raise TrainingDiverged(f"training diverged: non-finite {what} at {where} ({why}); "
                           f"{resume}{skip}; a lower train.lr needs a new output_dir")
