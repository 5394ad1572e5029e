"""Entry point: `accelerate launch delo_dist/train.py RECIPE.yaml [key.sub=value ...]`.

Also runs as `python -m delo_dist.train ...` or `python delo_dist/train.py ...` (one process).

A job that cannot go on ends with one line on stderr, the last it prints, and an exit status:
    0   finished (or nothing to do)
    2   refused before or during training for bad input: recipe or command line, launch,
        data or manifest, tracking server, a damaged checkpoint
    3   training diverged: a non-finite loss or gradient norm (train.nonfinite)
    74  a write failed (disk full, read-only, over quota): path and free space named
    75  preempted (a stop signal): checkpoint written, relaunch to resume
Launched by `accelerate launch`, the launcher adds its own traceback after that line and
exits 1; `python -m delo_dist.launch` (same arguments) ends with the trainer's line and status.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by accelerate launch: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delo_dist.config import RecipeError, load_recipe  # noqa: E402

USAGE = "usage: accelerate launch delo_dist/train.py RECIPE.yaml [key.sub=value ...]"
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED = 2, 3, 74   # 75: trainer.EXIT_PREEMPTED
ERROR_FILE_ENV = "DELO_ERROR_FILE"   # where delo_dist.launch reads the last line and status
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def record(status: int, line: str) -> None:
    """Leave the final line and status where a wrapping launcher looks (delo_dist.launch);
    the first rank to get there writes it (the others said the same)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return   # written by another rank, or unwritable: the line is on stderr anyway
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"status": status, "line": line}))


def fail(status: int, line: str) -> int:
    """Print the job's last line. Every rank does: these errors are agreed, and a launcher
    stops the other ranks as soon as one exits, so no single rank is sure to get it out."""
    print(line, file=sys.stderr, flush=True)
    record(status, line)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from delo_dist.training import stopping
    stopping.die_with_parent()  # a launcher that dies (SIGTERM/SIGKILL) takes no trainer with it
    stopping.set_job_args(argv)
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as e:
        return fail(EXIT_BAD_INPUT, f"recipe error: {e}")
    from delo_dist.tracking import TrackingUnreachable, probe, resolve_uri
    if recipe.eval.checkpoint is None and os.environ.get("WORLD_SIZE", "1") == "1":
        # One process: probe the tracking server before the heavy imports (the trainer probes
        # again after the ranks have met, where several processes must agree to stop).
        try:
            probe(resolve_uri(recipe))
        except TrackingUnreachable as e:
            return fail(EXIT_BAD_INPUT, f"tracking error: {e}")
    from delo_dist.data.shards import DataIntegrityError
    from delo_dist.training.checkpoint import CheckpointError, CheckpointWriteError, write_failure
    from delo_dist.training.stopping import TrainingDiverged
    from delo_dist.training.trainer import EXIT_PREEMPTED, LaunchError, Trainer
    trainer = Trainer(recipe)
    try:
        status = trainer.run()
    except LaunchError as e:
        return fail(EXIT_BAD_INPUT, f"launch error: {e}")
    except TrackingUnreachable as e:
        return fail(EXIT_BAD_INPUT, f"tracking error: {e}")
    except CheckpointError as e:
        return fail(EXIT_BAD_INPUT, f"checkpoint error: {e}")
    except DataIntegrityError as e:
        return fail(EXIT_BAD_INPUT, f"data error: {e}")
    except TrainingDiverged as e:
        return fail(EXIT_DIVERGED, str(e))
    except CheckpointWriteError as e:
        return fail(EXIT_WRITE_FAILED, f"write error: {e}")
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        return fail(EXIT_WRITE_FAILED, f"write error: {write_failure(e, Path(recipe.output_dir))}")
    if status == EXIT_PREEMPTED:
        record(status, getattr(trainer, "final_line", "preempted"))
    return status


if __name__ == "__main__":
    sys.exit(main())
