"""Stopping cleanly, whoever is asked to stop.

- STOP_SIGNALS: SIGTERM (timeout, a shell, a scheduler), SIGUSR1 (Slurm's warning before a
  time limit) and SIGINT (Ctrl-C, `kill -INT`) all mean: checkpoint after this step, exit.
- `die_with_parent`: accelerate's one-process launcher neither forwards SIGTERM nor survives
  it, and a launcher killed outright leaves its trainers behind. Linux's parent-death signal
  makes the kernel send SIGTERM to the trainer when its parent (the launcher, or torchrun's
  agent) dies, so the trainer checkpoints and exits instead of running on as an orphan.
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


def resume_command() -> str:
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"accelerate launch delo_dist/train.py {args}"


def mark_preempted(out: Path, checkpoint: Path) -> str:
    """Write the marker; return the one line to print."""
    info = {"checkpoint": str(checkpoint), "resume": resume_command(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    tmp = Path(out) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, Path(out) / MARKER)
    return (f"preempted: checkpoint {checkpoint}; resume by relaunching the same command "
            f"({info['resume']}); marker {Path(out) / MARKER}")


def clear_marker(out: Path) -> None:
    (Path(out) / MARKER).unlink(missing_ok=True)
