"""`python -m delo_dist.launch` takes `accelerate launch`'s arguments and runs the same launch,
but a failed job ends with the trainer's own last line and exit status:

    python -m delo_dist.launch --config_file accelerate_configs/default.yaml delo_dist/train.py recipes/quickstart.yaml

`accelerate launch` follows a failed trainer with a traceback of its own (a
CalledProcessError for one process, torch elastic's ChildFailedError table for several) and
exits 1 whatever the trainer said. Here the launch runs in this process with `--quiet`, the
trainer leaves its last line and status in a file (delo_dist/train.py), and this prints that
line last and exits with that status (train.py lists them). A trainer that died without
leaving one (a bug: its traceback is above) ends with the launcher's status.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from delo_dist.train import ERROR_FILE_ENV



def _status_of(e: BaseException) -> int:
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else 1
    if isinstance(e, subprocess.CalledProcessError):
        return e.returncode
    if hasattr(e, "get_first_failure"):   # torch elastic's ChildFailedError: the root cause
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code or 1   # killed by signal N: 128 + N
    return 1


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.quiet = True   # the one-process launcher then exits 1 without its traceback
    with tempfile.TemporaryDirectory(prefix="delo-launch-") as tmp:
        last = Path(tmp) / "last.json"
        os.environ[ERROR_FILE_ENV] = str(last)
        try:
            launch_command(args)
            status = 0
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the launcher's ways to say "failed"
            status = _status_of(e)
        finally:
            os.environ.pop(ERROR_FILE_ENV, None)
        if last.is_file():
            said = json.loads(last.read_text())
            print(said["line"], file=sys.stderr, flush=True)
            return int(said["status"])
    return status


if __name__ == "__main__":
    sys.exit(main())
