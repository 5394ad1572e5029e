"""The local sweep runner: grid syntax, exclusion rule, Slurm blocks, the paper's sweep files,
the grid slurm/sweep.sbatch gets from it, the run-identity skip, and a real 2-run grid (two
tiny trainings as subprocesses, then skipped on relaunch, a changed recipe refused)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

from delo_dist import plugins
from delo_dist.sweep import Point, applies, done_state, expand, main, parse_grid, slurm_commands

SWEEP = REPO / "recipes" / "sweeps" / "compare_all.yaml"
SWEEPS = REPO / "recipes" / "sweeps"
PAPER_METHODS = ["map", "msp", "l2p", "dualprompt", "rebq", "delo"]   # Tables 2 and 3, in order
PROMPT_METHODS = ["map", "msp", "l2p", "dualprompt", "coda_prompt", "rebq"]
PAPER_ETAS = ["0.1", "0.3", "0.5", "0.7", "0.9"]
# the prompt methods are built beside this branch; once they are plug-ins, every point of the
# paper's sweep files resolves and the dry runs below count the whole grid
PROMPTS_WIRED = set(PROMPT_METHODS) <= set(plugins.names("method"))


def sweep_overrides(shards, out, **extra) -> list[str]:
    """The tiny recipe's overrides less output_dir: a sweep sets each run's own."""
    return [o for o in tiny_overrides(shards, out, **extra) if not o.startswith("output_dir=")]


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_output_dir_is_refused_naming_output_root(shards, tmp_path, capsys):
    assert main([str(REPO / "recipes" / "quickstart.yaml"), f"data.shards={shards}",
                 f"output_dir={tmp_path / 'mine'}", "seed=0,1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"give output_root={tmp_path / 'mine'} instead" in err and "output_dir" in err
    assert not (tmp_path / "mine").exists()


def test_compare_all_grid_and_exclusion_rule():
    name, recipe, fixed, axes, root = parse_grid(str(SWEEP), [])
    assert (name, recipe) == ("compare_all", "recipes/quickstart.yaml")
    assert axes["data.eta"] == ["0.1", "0.5", "0.9"] and axes["seed"] == ["0", "1", "2"]
    assert set(axes["method.name"]) == {"delo", "lora", "mail", "mora", "seq_lora", "seq_mail",
                                        "seq_mora", "head_only"}
    assert "train.epochs=4" in fixed and str(root) == "outputs/sweeps/compare_all"
    # the rule is the plug-ins' own: MoRA needs two encoders, which only CLIP declares
    assert applies("mora", "vilt") == "mora needs 'two_encoders', which vilt lacks"
    assert applies("mora", "clip") is None and applies("mail", "vilt") is None
    assert [m for m in axes["method.name"] if applies(m, "vilt")] == ["mora", "seq_mora"]
    # Slurm: one array per backbone, MoRA only in CLIP's; sizes add up to the grid
    vilt, clip = slurm_commands(name, recipe, fixed, axes)
    assert vilt.startswith("sbatch --array=0-53 slurm/sweep.sbatch recipes/quickstart.yaml ")
    assert "method.name=delo,lora,mail,seq_lora,seq_mail,head_only" in vilt
    assert clip.startswith("sbatch --array=0-71 ") and "mora,seq_lora,seq_mail,seq_mora" in clip
    # command-line values replace the file's; one value for a file axis keeps it an axis
    _, _, fixed, axes, _ = parse_grid(str(SWEEP), ["backbone.name=vilt", "train.epochs=1",
                                                   "seed=0,1", "output_root=/tmp/x"])
    assert axes["backbone.name"] == ["vilt"] and axes["seed"] == ["0", "1"]
    assert "train.epochs=1" in fixed and "train.epochs=4" not in fixed


def test_a_bad_grid_value_stops_before_any_training(shards, tmp_path, capsys):
    args = [str(REPO / "recipes" / "quickstart.yaml"), *sweep_overrides(shards, tmp_path / "x"),
            "data.eta=0.1,1.5", f"output_root={tmp_path / 'sweep'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "grid point {'data.eta': '1.5'}" in err and "data.eta" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_runner_trains_a_two_run_grid_skips_it_after_and_refuses_a_changed_recipe(
        shards, tmp_path, capsys):
    root = tmp_path / "sweep"
    base = [str(REPO / "recipes" / "quickstart.yaml"),
            *sweep_overrides(shards, tmp_path / "unused", **{"data.sessions": 2,
                                                              "tracking.uri": f"sqlite:///{root / 'mlflow.db'}"}),
            "method.name=head_only,mail", f"output_root={root}"]
    assert main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs (2 to train" in out and "head_only -> " in out and not root.exists()

    assert main(base + ["--jobs", "2"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("[")]
    assert len(lines) == 2 and all(" AP " in x and " FG " in x for x in lines), out
    for method, folder in (("head_only", "headonly"), ("mail", "mail")):   # sbatch's slug rule
        m = json.loads((root / folder / "metrics.json").read_text())
        assert m["method"] == method and len(m["accuracy_matrix"]) == 2
        assert f"AP {100 * m['ap']:.2f}" in out
    assert "2 trained, 0 finished before, 0 failed" in out

    assert main(base) == 0                                   # relaunch: nothing to train
    out = capsys.readouterr().out
    assert out.count("skipped (finished before)") == 2 and "0 trained, 2 finished before" in out

    assert main(base + ["train.lr=0.01"]) == 1               # a result key changed: refused
    out = capsys.readouterr().out
    assert out.count("CONFLICT") == 2 and "train.lr: 0.001 -> 0.01" in out

    from delo_dist.compare import main as compare
    assert compare(["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--tag", "sweep=quickstart",
                    "--no-log", "--out", str(root / "cmp")]) == 0
    rows = list(csv.DictReader(open(root / "cmp" / "compare.csv")))
    assert sorted(r["method.name"] for r in rows) == ["head_only", "mail"]


# ---------------------------------------------------------------- the paper's sweep files
@pytest.mark.slow  # trains or launches a process: not in the fast loop
@pytest.mark.parametrize("table, recipe", [("paper_table2", "recipes/food101.yaml"),
                                           ("paper_table3", "recipes/mmimdb.yaml")])
def test_paper_sweep_files_hold_the_papers_grid(table, recipe, capsys):
    name, path, fixed, axes, root = parse_grid(str(SWEEPS / f"{table}.yaml"), [])
    assert (name, path, str(root)) == (table, recipe, f"outputs/sweeps/{table}")
    assert axes == {"seed": ["0", "1", "2"], "data.eta": PAPER_ETAS,
                    "data.missing_type": ["text", "image", "both"], "method.name": PAPER_METHODS}
    assert {"data.both_ratio=0.5", "method.delo.factor_rank=4", f"tracking.tags.sweep={table}"} <= set(fixed)
    # 15 missing settings x 6 methods x 3 seeds, one array (no backbone axis to split by)
    assert main([str(SWEEPS / f"{table}.yaml"), "--count"]) == 0
    assert capsys.readouterr().out == "270\n"
    (command,) = slurm_commands(name, path, fixed, axes)
    assert command.startswith(f"sbatch --array=0-269 slurm/sweep.sbatch {recipe} ")
    assert "method.name=map,msp,l2p,dualprompt,rebq,delo" in command
    # seed slowest, method fastest: the first 90 points are seed 0 over the whole table
    assert main([str(SWEEPS / f"{table}.yaml"), "--print-overrides"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 270
    assert lines[0] == "0: seed=0 data.eta=0.1 data.missing_type=text method.name=map"
    assert lines[89] == "89: seed=0 data.eta=0.9 data.missing_type=both method.name=delo"
    assert lines[269] == "269: seed=2 data.eta=0.9 data.missing_type=both method.name=delo"


def test_cpu_sweep_file_holds_every_prompt_method_beside_the_lora_family():
    name, path, fixed, axes, _ = parse_grid(str(SWEEPS / "paper_cpu.yaml"), [])
    assert path == "recipes/quickstart_content.yaml"
    assert axes == {"seed": ["0", "1", "2"], "data.eta": ["0.1", "0.5", "0.9"],
                    "method.name": PROMPT_METHODS + ["delo", "lora", "mail", "seq_lora"]}
    assert {"data.missing_type=both", "method.delo.factor_rank=4", "train.epochs=4"} <= set(fixed)
    (command,) = slurm_commands(name, path, fixed, axes)
    assert command.startswith("sbatch --array=0-89 ")


def test_paper_sweep_dry_run_resolves_the_methods_that_exist(shards, tmp_path, capsys):
    """The whole 15-setting grid through the runner (every point resolved, DeLo at factor_rank
    = rank), over the methods registered on this branch (command-line axis override)."""
    spec = str(SWEEPS / "paper_table2.yaml")
    args = [spec, f"data.shards={shards}", f"output_root={tmp_path / 'sweep'}", "--dry-run"]
    assert main(args[:-1] + ["method.name=delo,lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "90 runs (90 to train, 0 finished before, 0 conflicts), 0 excluded" in out
    assert "axes seed (3), data.eta (5), data.missing_type (3), method.name (2)" in out
    assert f"0: seed=0 data.eta=0.1 data.missing_type=text method.name=delo -> {tmp_path}/sweep/0_0.1_text_delo" in out
    assert not (tmp_path / "sweep").exists()
    points, _ = expand(*parse_grid(spec, [f"data.shards={shards}", "method.name=delo"]))
    assert len(points) == 45 and {(p.recipe.method.settings.factor_rank, p.recipe.method.settings.rank,
                                   p.recipe.data.both_ratio) for p in points} == {(4, 4, 0.5)}
    assert {(p.recipe.data.eta, p.recipe.data.missing_type) for p in points} == \
        {(e, t) for e in (0.1, 0.3, 0.5, 0.7, 0.9) for t in ("text", "image", "both")}


@pytest.mark.slow  # trains or launches a process: not in the fast loop
@pytest.mark.skipif(not PROMPTS_WIRED, reason="the prompt methods are not plug-ins on this branch yet")
@pytest.mark.parametrize("table", ["paper_table2", "paper_table3", "paper_cpu"])
def test_paper_sweep_dry_run_resolves_every_point(table, shards, tmp_path, capsys):
    shards_arg = [] if table == "paper_cpu" else [f"data.shards={shards}"]
    assert main([str(SWEEPS / f"{table}.yaml"), *shards_arg, f"output_root={tmp_path}", "--dry-run"]) == 0
    total = 90 if table == "paper_cpu" else 270
    assert f"{total} runs ({total} to train, 0 finished before, 0 conflicts), 0 excluded" in capsys.readouterr().out


# ---------------------------------------------------------------- slurm/sweep.sbatch's grid
@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_sbatch_task_trains_the_point_python_gives_it(tmp_path):
    """Array task I of slurm/sweep.sbatch launches what `--index I --print-overrides` says,
    here from a sweep file. Outside Slurm: `srun` and `scontrol` are stand-ins that record
    the launch (tests/test_slurm.py runs the script on a real cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)

    def task(index: int, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        record = tmp_path / f"srun-{index}"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "78",
               "SLURM_JOB_NODELIST": "node0", "OUT_ROOT": str(tmp_path / "out"), "SRUN_ARGS": str(record)}
        done = subprocess.run(["bash", "slurm/sweep.sbatch", str(SWEEPS / "paper_table2.yaml"), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        argv = record.read_text().splitlines() if record.exists() else []
        return done, argv[argv.index("node") + 1:] if "node" in argv else argv

    done, argv = task(269, "data.shards=/fast/food101")
    assert done.returncode == 0, done.stdout + done.stderr   # no metrics, no marker: not requeued
    out = tmp_path / "out" / "77_269-2_0.9_both_delo"
    assert argv == ["recipes/food101.yaml", "data.both_ratio=0.5", "method.delo.factor_rank=4",
                    "tracking.experiment=delo-dist-food101-table2", "tracking.tags.sweep=paper_table2",
                    "data.shards=/fast/food101", "seed=2", "data.eta=0.9", "data.missing_type=both",
                    "method.name=delo", f"output_dir={out}", "tracking.run_name=2_0.9_both_delo-77_269"]
    assert "task 269/270" in done.stdout and "not requeued" in done.stderr
    _, argv = task(1)
    assert argv[-6:-2] == ["seed=0", "data.eta=0.1", "data.missing_type=text", "method.name=msp"]
    done, argv = task(270)
    assert done.returncode == 2 and "use --array=0-269" in done.stderr and argv == []


# ---------------------------------------------------------------- "finished before": run identity
def test_finished_runs_are_judged_by_the_trainers_run_identity(shards, tmp_path):
    from delo_dist.config import load_recipe, to_dict
    from delo_dist.data.shards import manifest_sha256
    from delo_dist.training import run_identity
    out = tmp_path / "run"

    def point(*extra: str) -> Point:
        over = tiny_overrides(shards, out, **{"data.sessions": 2}) + list(extra)
        return Point(0, {}, over, out, load_recipe(REPO / "recipes" / "quickstart.yaml", over))

    assert done_state(point()) == ("pending", "")
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert done_state(point())[0] == "conflict"              # metrics without a recorded recipe
    run_identity.record(out, to_dict(point().recipe), manifest_sha256(shards))
    assert done_state(point()) == ("skipped", "finished before")
    assert done_state(point("eval.batch_size=3", "tracking.run_name=x"))[0] == "skipped"  # neutral
    state, why = done_state(point("train.lr=0.01"))
    assert state == "conflict" and "train.lr: 0.001 -> 0.01" in why
    run_identity.record(out, to_dict(point().recipe), "0" * 64)   # the same recipe, other data
    state, why = done_state(point())
    assert state == "conflict" and why.startswith("finished on other data") and "manifest" in why
