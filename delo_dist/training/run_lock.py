"""One live job per output folder: an exclusive lock on `<output_dir>/.lock`, which also holds
the owner's host and PID so that a refused job can say who is using the folder.

The lock is a kernel lock (fcntl.flock): it goes away with the process that held it, however
that process ended, so a lock "left behind" is only the info in the file. Finding info and
getting the lock means the previous owner is gone: it is taken over with a message. A job
that ends (finished, failed, preempted) removes the file; only a killed one leaves it.
Removing a lock file is safe because a job that locked a file no longer at that path (it
was removed meanwhile) lets it go and locks the new one.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """Another live job holds the output folder."""


class RunLock:
    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a message if a dead job's lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise RunLockError(
                    f"{self.path.parent}: another job is using this output folder (pid "
                    f"{owner.get('pid', '?')} on host {owner.get('host', '?')}, since "
                    f"{owner.get('since', '?')}): wait for it, stop it, or choose another output_dir")
            if _same_file(fd, self.path):
                break
            os.close(fd)   # its owner removed it as we opened it: lock the one there now
        previous = _read(fd)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        if previous:
            return (f"{self.path}: taking over the lock of pid {previous.get('pid')} on host "
                    f"{previous.get('host')} (that process is gone)")
        return None

    def release(self) -> None:
        if self.fd is not None:
            if _same_file(self.fd, self.path):
                self.path.unlink()     # while still locked: no owner info left behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
