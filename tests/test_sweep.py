"""The local sweep runner: grid syntax, exclusion rule, Slurm blocks, and a real 2-run grid
(two tiny trainings as subprocesses, then skipped on relaunch, a changed recipe refused)."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO, tiny_overrides

from delo_dist.sweep import ONLY_ON_BACKBONES, applies, main, parse_grid, slurm_commands

SWEEP = REPO / "recipes" / "sweeps" / "compare_all.yaml"


def sweep_overrides(shards, out, **extra) -> list[str]:
    """The tiny recipe's overrides less output_dir: a sweep sets each run's own."""
    return [o for o in tiny_overrides(shards, out, **extra) if not o.startswith("output_dir=")]


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
    assert not applies("mora", "vilt") and applies("mora", "clip") and applies("mail", "vilt")
    assert set(ONLY_ON_BACKBONES) == {"mora", "seq_mora"}
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
