"""Run a grid of recipe overrides on one machine, one run after another (or N at a time).

    python -m delo_dist.sweep RECIPE.yaml key=v1,v2 ... [key=value ...] [--dry-run] [--jobs N]
    python -m delo_dist.sweep recipes/sweeps/compare_all.yaml [key=v1,v2 ...] [--dry-run] [--jobs N]
    python -m delo_dist.sweep recipes/sweeps/compare_all.yaml --slurm   # the sbatch commands
    python -m delo_dist.sweep SPEC [key=v1,v2 ...] --count                # grid size
    python -m delo_dist.sweep SPEC [key=v1,v2 ...] --print-overrides [--index I]

The grid syntax is slurm/sweep.sbatch's, which asks this module for its points: an override
whose value is a comma list (not in [] or {}) is an axis, the last axis varies fastest,
others are fixed. A sweep file holds `recipe`, fixed `overrides`, `axes` (key: list of
values) and `output_root`; command-line axes and overrides replace the file's. Grid points
where a method does not apply to the backbone are excluded: a method's `needs` that the
backbone's `capabilities` lack (both declared by the plug-ins; listed by --dry-run).

Each run trains `python -m delo_dist.train RECIPE <overrides> output_dir=<root>/<values>` with
its console in <run>/sweep.log, one progress line per run here, and a summary at the end. A
run whose folder already holds metrics.json is judged by the trainer's own run identity
(training/run_identity.py): the same result-shaping keys and the same data (manifest hash)
is skipped; anything else is a conflict (listed, never overwritten). Every run is resolved
before the first starts, so a bad value stops the sweep at once. Exit 0 only when every
point finished. MLflow: runs log where the recipe says (default: sqlite in <root>), tagged
`sweep=<name>`; `python -m delo_dist.compare` makes the table.

`--count` and `--print-overrides` are grid arithmetic only (no recipe is resolved, nothing is
excluded: an sbatch array covers the whole product of its axes, and the trainer refuses a
method its backbone cannot run): `--print-overrides --index I` prints point I's folder name
(its axis values) on the first line, then the trainer's arguments one per line: the recipe,
the fixed overrides (a sweep file's include `tracking.tags.sweep=<name>`), the axis values;
without --index, one line per point: `I: <axis overrides>`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from delo_dist.config import RecipeError, load_recipe, to_dict
from delo_dist.training import run_identity

def applies(method: str, backbone: str) -> str | None:
    """None if the method can run on the backbone, else why not (a capability it needs that
    the backbone lacks: the plug-ins declare both)."""
    from delo_dist import plugins
    missing = list(plugins.missing_capabilities(plugins.get("method", method),
                                                plugins.get("backbone", backbone)))
    return f"{method} needs '{missing[0]}', which {backbone} lacks" if missing else None


@dataclass
class Point:
    index: int
    axes: dict                   # axis key -> value (strings, as given)
    overrides: list[str]         # everything passed to the trainer, output_dir included
    out: Path
    recipe: object = None        # the resolved Recipe
    state: str = "pending"       # pending / finished / skipped / conflict / failed
    note: str = ""
    seconds: float = 0.0
    result: dict = field(default_factory=dict)


def is_axis(value: str) -> bool:
    return "," in value and not value.startswith(("[", "{"))


def slug(values) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]", "", str(v)) for v in values) or "setting"


def parse_grid(spec: str, extra: list[str]) -> tuple[str, str, list[str], dict, Path]:
    """(name, recipe path, fixed overrides, axes, output root) from a sweep file or a recipe
    plus command-line overrides (which replace the file's)."""
    tree = yaml.safe_load(Path(spec).read_text()) if Path(spec).is_file() else None
    if not isinstance(tree, dict):
        raise RecipeError(f"{spec}: not a recipe or sweep file")
    if "axes" in tree:  # a sweep file
        unknown = set(tree) - {"recipe", "overrides", "axes", "output_root", "name"}
        if unknown or "recipe" not in tree:
            raise RecipeError(f"{spec}: a sweep file holds recipe, overrides, axes, output_root "
                              f"and name; got {sorted(tree)}")
        name = tree.get("name", Path(spec).stem)
        recipe = tree["recipe"]
        fixed = {str(k): _text(v) for k, v in (tree.get("overrides") or {}).items()}
        if "output_dir" in fixed or "output_dir" in tree["axes"]:
            raise RecipeError(f"{spec}: output_dir is set per run (<output_root>/<its values>): "
                              "give the sweep's output_root instead")
        axes = {str(k): [_text(x) for x in v] for k, v in tree["axes"].items()}
        for k, v in axes.items():
            if not isinstance(tree["axes"][k], list) or not v:
                raise RecipeError(f"{spec}: axis '{k}' must be a non-empty list")
        root = tree.get("output_root") or f"outputs/sweeps/{name}"
        fixed.setdefault("tracking.tags.sweep", name)   # what compare --tag sweep=<name> finds
    else:
        name, recipe, fixed, axes, root = Path(spec).stem, spec, {}, {}, None
    for item in extra:
        if "=" not in item:
            raise RecipeError(f"command line: '{item}' must look like key=value or key=v1,v2")
        k, v = item.split("=", 1)
        if k == "output_dir":   # every run has its own: <output_root>/<its values>
            raise RecipeError(f"command line: '{item}': a sweep sets each run's output_dir to "
                              "<output_root>/<its values>; give output_root=" + v + " instead")
        if k == "output_root":
            root = v
        elif is_axis(v) or k in axes:  # a file's axis given one value stays an axis: run
            axes[k] = v.split(",")      # folders keep their names whatever the selection
            fixed.pop(k, None)
        else:
            fixed[k] = v
            axes.pop(k, None)
    root = Path(root or f"outputs/sweeps/{name}")
    return name, recipe, [f"{k}={v}" for k, v in fixed.items()], axes, root


def _text(v) -> str:
    """A YAML value as the command line would spell it."""
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


def sweep_tag(name: str, fixed: list[str]) -> list[str]:
    """The MLflow tag `sweep=<name>` (compare --tag sweep=<name>) unless already fixed."""
    return [] if any(o.startswith("tracking.tags.sweep=") for o in fixed) else [f"tracking.tags.sweep={name}"]


def expand(name: str, recipe_path: str, fixed: list[str], axes: dict, root: Path):
    """(points that apply, excluded (axes, reason) pairs); every point's recipe resolved."""
    base = load_recipe(recipe_path, fixed)  # imports the recipe's own plug-ins too
    points, excluded = [], []
    for index in range(grid_size(axes)):   # the order and folders of the array tasks
        folder, over, point_axes = grid_point(fixed, axes, index)
        method = point_axes.get("method.name", base.method.name)
        backbone = point_axes.get("backbone.name", base.backbone.name)
        why = applies(method, backbone)
        if why:
            excluded.append((point_axes, why))
            continue
        out = root / folder
        over += [f"output_dir={out}", *sweep_tag(name, fixed)]
        try:
            recipe = load_recipe(recipe_path, over)
        except RecipeError as e:
            raise RecipeError(f"grid point {point_axes}: {e}") from e
        points.append(Point(len(points), point_axes, over, out, recipe))
    return points, excluded


def done_state(p: Point) -> tuple[str, str]:
    """('pending' | 'skipped' | 'conflict', why) from what the run folder holds, judged as the
    trainer judges a relaunch (run_identity): finished with the same result-shaping keys on
    the same data is done; anything else is not ours to overwrite."""
    metrics = p.out / "metrics.json"
    if not metrics.is_file():
        return "pending", ""
    if not (p.out / run_identity.RECIPE_FILE).is_file():
        return "conflict", f"{metrics} without {run_identity.RECIPE_FILE}"
    shaping, _ = run_identity.differences(p.out, to_dict(p.recipe))
    if shaping:
        return "conflict", "finished with other settings: " + ", ".join(shaping)
    manifest = Path(p.recipe.data.shards) / "manifest.json"
    if manifest.is_file():   # absent: synthetic data not made yet, nothing to compare
        from delo_dist.data.shards import manifest_sha256
        try:
            run_identity.check_data(p.out, manifest_sha256(manifest.parent))
        except run_identity.RunIdentityError as e:
            return "conflict", f"finished on other data: {e}"
    return "skipped", "finished before"


def summary_of(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {"ap": m["ap"], "fg": m["fg"], "wall_time_s": m.get("wall_time_s")}


def label(p: Point) -> str:
    """method=<name> eta=0.1 seed=0: the axes, by their last key part (`*.name`: the first)."""
    short = lambda k: k.split(".")[0] if k.endswith(".name") else k.rsplit(".", 1)[-1]  # noqa: E731
    return " ".join(f"{short(k)}={v}" for k, v in p.axes.items()) or "setting"


def train(p: Point, recipe_path: str, launcher: list[str], env: dict) -> None:
    p.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(p.out / "sweep.log", "a") as log:
        log.write(f"\n$ {shlex.join(launcher + [recipe_path] + p.overrides)}\n")
        log.flush()
        rc = subprocess.run(launcher + [recipe_path] + p.overrides, stdout=log,
                            stderr=subprocess.STDOUT, env=env).returncode
    p.seconds = time.time() - t0
    if rc == 0 and (p.out / "metrics.json").is_file():
        p.state, p.result = "finished", summary_of(p.out)
    else:
        p.state, p.note = "failed", f"exit code {rc}, see {p.out / 'sweep.log'}"


def progress(p: Point, total: int, lock: threading.Lock) -> None:
    what = {"finished": lambda: f"AP {100 * p.result['ap']:.2f}  FG {100 * p.result['fg']:.2f}",
            "skipped": lambda: "skipped (finished before)",
            "conflict": lambda: f"CONFLICT: {p.note}",
            "failed": lambda: f"FAILED: {p.note}"}[p.state]()
    with lock:
        print(f"[{p.index + 1}/{total}] {label(p)}: {what}"
              + (f"  ({p.seconds:.0f} s)" if p.seconds else ""), flush=True)


def slurm_commands(name: str, recipe_path: str, fixed: list[str], axes: dict) -> list[str]:
    """One sbatch array per block of the grid that is a full product (excluded method x
    backbone pairs split the grid by backbone)."""
    blocks = []
    backbones = axes.get("backbone.name", [None])
    for b in backbones:
        block = dict(axes)
        if b is not None:
            block["backbone.name"] = [b]
            if "method.name" in block:
                block["method.name"] = [m for m in block["method.name"] if not applies(m, b)]
        if any(not v for v in block.values()):
            continue
        count = grid_size(block)
        args = fixed + [f"{k}={','.join(v)}" for k, v in block.items()] + sweep_tag(name, fixed)
        blocks.append(f"sbatch --array=0-{count - 1} slurm/sweep.sbatch {recipe_path} "
                      + " ".join(shlex.quote(a) for a in args))
    return blocks


def grid_size(axes: dict) -> int:
    return math.prod(len(v) for v in axes.values())


def grid_point(fixed: list[str], axes: dict, index: int) -> tuple[str, list[str], dict]:
    """(folder name, trainer overrides, axis values) of point `index` of the full product,
    the last axis varying fastest (what array task `index` of slurm/sweep.sbatch trains)."""
    values = []
    for v in reversed(list(axes.values())):
        index, i = divmod(index, len(v))
        values.insert(0, v[i])
    point = dict(zip(axes, values))
    return slug(values), fixed + [f"{k}={v}" for k, v in point.items()], point


def print_overrides(recipe_path: str, fixed: list[str], axes: dict, index: int | None) -> int:
    size = grid_size(axes)
    if index is None:
        for i in range(size):
            print(f"{i}: " + " ".join(f"{k}={v}" for k, v in grid_point(fixed, axes, i)[2].items()))
        return 0
    if not 0 <= index < size:
        print(f"array index {index} is outside the grid (size {size}): use --array=0-{size - 1}",
              file=sys.stderr)
        return 2
    name, overrides, _ = grid_point(fixed, axes, index)
    print("\n".join([name, recipe_path, *overrides]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m delo_dist.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="a sweep file (recipes/sweeps/*.yaml) or a recipe")
    p.add_argument("overrides", nargs="*", help="key=value (fixed) or key=v1,v2 (an axis)")
    p.add_argument("--dry-run", action="store_true", help="list the grid and what would run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--slurm", action="store_true", help="print the sbatch commands instead")
    p.add_argument("--count", action="store_true", help="print the grid size (full product)")
    p.add_argument("--print-overrides", action="store_true",
                   help="print point --index's folder name and overrides, one per line (without "
                        "--index: every point's axis values); what slurm/sweep.sbatch reads")
    p.add_argument("--index", type=int, help="a point of the full product (an array index)")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m delo_dist.train",
                   help="command that trains one recipe (e.g. 'accelerate launch --config_file "
                        "accelerate_configs/single_gpu.yaml delo_dist/train.py')")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs wants an int >= 1")
    try:
        name, recipe_path, fixed, axes, root = parse_grid(a.spec, a.overrides)
        if a.count:
            print(grid_size(axes))
            return 0
        if a.print_overrides:
            return print_overrides(recipe_path, fixed, axes, a.index)
        if a.index is not None:
            raise RecipeError("--index goes with --print-overrides")
        if a.slurm:
            print("\n".join(slurm_commands(name, recipe_path, fixed, axes)))
            return 0
        points, excluded = expand(name, recipe_path, fixed, axes, root)
    except RecipeError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    for pt in points:
        pt.state, pt.note = done_state(pt)
    todo = [pt for pt in points if pt.state == "pending"]
    print(f"sweep {name}: {len(points)} runs ({len(todo)} to train, "
          f"{sum(pt.state == 'skipped' for pt in points)} finished before, "
          f"{sum(pt.state == 'conflict' for pt in points)} conflicts), {len(excluded)} excluded; "
          f"axes {', '.join(f'{k} ({len(v)})' for k, v in axes.items())}; output {root}", flush=True)
    if a.dry_run:
        for pt in points:
            print(f"  {pt.index}: {' '.join(f'{k}={v}' for k, v in pt.axes.items())} -> {pt.out} "
                  f"[{'to train' if pt.state == 'pending' else pt.state}{': ' + pt.note if pt.note else ''}]")
        for ax, why in excluded:
            print(f"  excluded: {' '.join(f'{k}={v}' for k, v in ax.items())} ({why})")
        return 0

    env = dict(os.environ)
    if a.jobs > 1 and "OMP_NUM_THREADS" not in env:  # N trainers share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.jobs))
    launcher, lock, t0 = shlex.split(a.launcher), threading.Lock(), time.time()
    for pt in points:
        if pt.state != "pending":
            progress(pt, len(points), lock)

    def one(pt: Point) -> None:
        train(pt, recipe_path, launcher, env)
        progress(pt, len(points), lock)

    if todo:  # the first alone: it may build the synthetic data the others read
        one(todo[0])
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(one, todo[1:]))
    counts = {s: sum(pt.state == s for pt in points) for s in ("finished", "skipped", "conflict", "failed")}
    print(f"\nsweep {name}: {counts['finished']} trained, {counts['skipped']} finished before, "
          f"{counts['failed']} failed, {counts['conflict']} conflicts, {len(excluded)} excluded; "
          f"{time.time() - t0:.0f} s", flush=True)
    for pt in points:
        if pt.state in ("failed", "conflict"):
            print(f"  {pt.state}: {label(pt)}: {pt.note}")
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or (points and points[0].recipe.tracking.uri)
           or f"sqlite:///{root.resolve()}/mlflow.db")
    print(f"table: python -m delo_dist.compare --tracking-uri {uri} --tag sweep={name} "
          f"--out {root}/compare")
    return 0 if counts["failed"] == counts["conflict"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
