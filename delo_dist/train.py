"""Entry point: `accelerate launch delo_dist/train.py RECIPE.yaml [key.sub=value ...]`.

Also runs as `python -m delo_dist.train ...` or `python delo_dist/train.py ...` (one process).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by accelerate launch: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delo_dist.config import RecipeError, load_recipe  # noqa: E402

USAGE = "usage: accelerate launch delo_dist/train.py RECIPE.yaml [key.sub=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from delo_dist.training.stopping import die_with_parent
    die_with_parent()  # a launcher that dies (SIGTERM/SIGKILL) takes no trainer with it as an orphan
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2
    if recipe.eval.checkpoint is None and os.environ.get("WORLD_SIZE", "1") == "1":
        # One process: probe the tracking server before the heavy imports (the trainer probes
        # again after the ranks have met, where several processes must agree to stop).
        from delo_dist.tracking import TrackingUnreachable, probe, resolve_uri
        try:
            probe(resolve_uri(recipe))
        except TrackingUnreachable as e:
            print(f"tracking error: {e}", file=sys.stderr)
            return 2
    from delo_dist.training.trainer import LaunchError, Trainer
    try:
        return Trainer(recipe).run()
    except LaunchError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
