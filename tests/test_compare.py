"""delo_dist.compare against real MLflow stores: a tracking server on 127.0.0.1 with two tiny
training runs plus a failed and a running run made through the MLflow client, and a sqlite
store into which runs are logged directly (recipe params, tags, metrics) to test grouping."""
from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from delo_dist.compare import Cell, Run, main as compare_main, modality_pct
from delo_dist.config import flatten, load_recipe, to_dict
from tests.helpers import mlflow_server as _server

EXPERIMENT = "compare-test"


@contextlib.contextmanager
def mlflow_server(root: Path, timeout: float = 120):
    """A real `mlflow server` on a free 127.0.0.1 port; yields its URI (tests/helpers.py)."""
    with _server(root, timeout=timeout) as (uri, _):
        yield uri


def train(shards: Path, out: Path, uri: str, **extra) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
           *tiny_overrides(shards, out, **{"tracking.experiment": EXPERIMENT, **extra})]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_modality_percentages_and_cells():
    assert modality_pct("text", 0.7, 0.5) == (100.0, pytest.approx(30.0))
    assert modality_pct("image", 0.7, 0.5) == (pytest.approx(30.0), 100.0)
    assert modality_pct("both", 0.7, 0.5) == (pytest.approx(65.0), pytest.approx(65.0))
    assert modality_pct("both", 0.5, 0.2) == (pytest.approx(90.0), pytest.approx(60.0))
    run = lambda ap, status="finished", seed="0": Run("x", {}, seed, status, ap, 0.1)  # noqa: E731
    assert Cell([run(0.5), run(0.6, seed="1"), run(None, "failed")]).text("ap") == \
        "55.00 ± 7.07 (n=2; failed)"                 # sample std of 50 and 60: 7.07
    assert Cell([run(0.5)]).text("fg") == "10.00 (n=1)"
    assert Cell([run(0.5), run(0.5)]).text("ap") == "50.00 ± 0.00 (n=2; repeated seed)"
    assert Cell([run(None, "running"), run(None, "running")]).text("ap") == "2 running"


@pytest.mark.slow
def test_compare_table_matches_the_runs(shards, tmp_path):
    from mlflow.tracking import MlflowClient
    with mlflow_server(tmp_path) as uri:
        # Two finished runs in one setting (two methods), different seeds elsewhere.
        train(shards, tmp_path / "delo", uri, **{"method.name": "delo", "data.eta": 0.7,
                                                 "data.missing_type": "both"})
        train(shards, tmp_path / "lora", uri, **{"method.name": "lora", "data.eta": 0.7,
                                                 "data.missing_type": "both"})
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        finished = {r.data.tags["method"]: r for r in client.search_runs([exp])}
        # a failed delo run of seed 1 and a lora run still running elsewhere, with the
        # params and tags the trainer logs at its start
        def fake(method, status, **changes):
            src = finished[method].data
            params = {**src.params, "seed": "1", **changes}
            tags = {**src.tags, "seed": "1", **{k.split(".")[-1]: v for k, v in changes.items()}}
            run = client.create_run(exp, tags=tags)
            for k, v in params.items():
                client.log_param(run.info.run_id, k, v)
            if status == "FAILED":
                client.log_metric(run.info.run_id, "final_ap", 0.99)  # must not be averaged in
                client.set_terminated(run.info.run_id, status)
        fake("delo", "FAILED")
        fake("lora", "RUNNING", **{"data.eta": "0.3", "data.missing_type": "text"})

        out = tmp_path / "cmp"
        done = subprocess.run([sys.executable, "-m", "delo_dist.compare", "--tracking-uri", uri,
                               "--experiment", EXPERIMENT, "--dataset", "synthetic", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

        runs = {r.data.tags["method"]: r for r in client.search_runs([exp], "attributes.status = 'FINISHED'")
                if "final_ap" in r.data.metrics}
        assert set(runs) == {"delo", "lora"}
        ap = {m: f"{100 * r.data.metrics['final_ap']:.2f}" for m, r in runs.items()}
        fg = {m: f"{100 * r.data.metrics['final_fg']:.2f}" for m, r in runs.items()}

        lines = (out / "compare.md").read_text().splitlines()
        assert lines[0].startswith("Same in every run: ") and "keys, listed in constant_keys.md" in lines[0]
        constant = (out / "constant_keys.md").read_text()
        assert "| `train.epochs` | `1` |" in constant and "| `method.name` |" not in constant
        assert lines[2].startswith("Column groups: method.name.")
        rt = {m: f"{100 * r.data.metrics['final_routing_accuracy']:.2f}" for m, r in runs.items()}
        # both methods route by session (a head per session behind task identification)
        assert lines[4] == ("| η | #Image | #Text | DeLo AP ↑ | DeLo FG ↓ | DeLo routing | "
                            "DeLo-LoRA AP ↑ | DeLo-LoRA FG ↓ | DeLo-LoRA routing |")
        assert lines[-2:] == ["", "performance: accuracy"]      # the runs' metric tag
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[6:-2]]
        assert rows == [
            ["30%", "100%", "70%", "-", "-", "-", "running", "running", "running"],
            ["70%", "65%", "65%", f"{ap['delo']} (n=1; failed)", f"{fg['delo']} (n=1; failed)",
             f"{rt['delo']} (n=1; failed)", f"{ap['lora']} (n=1)", f"{fg['lora']} (n=1)",
             f"{rt['lora']} (n=1)"],
        ]
        table = list(csv.DictReader(open(out / "compare.csv")))
        assert [(r["eta"], r["method.name"]) for r in table] == [("0.3", "lora"), ("0.7", "delo"),
                                                                  ("0.7", "lora")]
        assert float(table[1]["ap_mean"]) == pytest.approx(100 * runs["delo"].data.metrics["final_ap"], abs=1e-5)
        assert table[1]["n"] == "1" and table[1]["unfinished"] == "failed" and table[1]["ap_std"] == ""
        assert table[0]["ap_mean"] == "" and table[0]["unfinished"] == "running"
        assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        summary = client.search_runs([exp], "tags.kind = 'compare-summary'")
        assert len(summary) == 1
        logged = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
        assert logged == {"compare.md", "compare_table.csv", "compare.csv", "constant_keys.md",
                          "compare.png"}


# ---------------------------------------------------------------- grouping, on a sqlite store
def log_run(uri: str, ap: float, fg: float = 0.05, status: str = "FINISHED",
            routing: float | None = None, section: dict | None = None, **overrides) -> None:
    """One run as the trainer logs it: the flattened recipe as params, its tags, final metrics.
    `section` ({"name": "map", "length": 16}) stands in for a method whose plug-in this store
    need not load: its name and own section replace the recipe's method keys, as its run
    would log them. `routing` nan: a method that routes nothing, as the trainer logs it."""
    import time
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    recipe = load_recipe(None, ["data.make_synthetic=true"] + [f"{k}={v}" for k, v in overrides.items()])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    params = flatten(to_dict(recipe))
    if section:
        name = section["name"]
        params = {k: v for k, v in params.items() if not k.startswith("method.")}
        params.update({"method.name": name, **{f"method.{name}.{k}": v for k, v in section.items()
                                               if k != "name"}})
    d = recipe.data
    tags = {"dataset": d.dataset, "method": params["method.name"], "eta": str(d.eta),
            "missing_type": d.missing_type, "both_ratio": str(d.both_ratio), "seed": str(recipe.seed)}
    run = client.create_run(exp_id, tags=tags)
    params = {**{k: str(v)[:500] for k, v in params.items()},
              "missing.s0_train.hash": f"h{recipe.seed}"}                 # derived: ignored
    metrics = {} if ap is None else {"final_ap": ap, "final_fg": fg,
                                     **({} if routing is None else {"final_routing_accuracy": routing})}
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status)


def compare_table(uri: str, out: Path) -> tuple[list[str], list[dict]]:
    assert compare_main(["--tracking-uri", uri, "--no-log", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text().splitlines()
    assert md[-2:] == ["", "performance: unrecorded"]   # these runs carry no metric tag
    return md[:-2], list(csv.DictReader(open(out / "compare.csv")))


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_runs_differing_in_a_recipe_key_are_never_merged(store, tmp_path):
    log_run(store, 0.40, **{"train.lr": 0.001})
    log_run(store, 0.60, **{"train.lr": 0.01})
    log_run(store, 0.50, **{"train.lr": 0.01, "task_id.source": "frozen_pooled"})
    md, table = compare_table(store, tmp_path / "cmp")
    assert "Column groups: method.name / task_id.source / train.lr." in md[2]
    assert md[4] == ("| η | #Image | #Text | DeLo / analytic / 0.001 AP ↑ | DeLo / analytic / "
                     "0.001 FG ↓ | DeLo / analytic / 0.01 AP ↑ | DeLo / analytic / 0.01 FG ↓ | "
                     "DeLo / frozen_pooled / 0.01 AP ↑ | DeLo / frozen_pooled / 0.01 FG ↓ |")
    assert [(r["train.lr"], r["task_id.source"], r["ap_mean"], r["n"]) for r in table] == [
        ("0.001", "analytic", "40.000000", "1"), ("0.01", "analytic", "60.000000", "1"),
        ("0.01", "frozen_pooled", "50.000000", "1")]
    constant = (tmp_path / "cmp" / "constant_keys.md").read_text()
    assert "| `train.epochs` | `3` |" in constant and "train.lr" not in constant


def test_seeds_are_averaged_with_their_sample_std(store, tmp_path):
    for seed, ap, fg in [(0, 0.40, 0.10), (1, 0.50, 0.20), (2, 0.45, 0.30)]:
        log_run(store, ap, fg, seed=seed)
    log_run(store, 0.99, seed=3, status="FAILED")   # named, never averaged
    log_run(store, 0.30, 0.0, seed=0, **{"method.name": "lora"})
    md, table = compare_table(store, tmp_path / "cmp")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[6:]]
    assert rows == [["70%", "65%", "65%", "45.00 ± 5.00 (n=3; failed)",
                     "20.00 ± 10.00 (n=3; failed)", "30.00 (n=1)", "0.00 (n=1)"]]
    delo = table[0]
    assert (float(delo["ap_mean"]), float(delo["ap_std"]), float(delo["fg_std"])) == \
        pytest.approx((45.0, 5.0, 10.0))
    assert (delo["n"], delo["seeds"], delo["unfinished"]) == ("3", "0 1 2", "failed")


def test_result_neutral_keys_do_not_split_groups(store, tmp_path):
    log_run(store, 0.40, seed=0, **{"output_dir": "a", "eval.batch_size": 8, "name": "x",
                                    "tracking.run_name": "r1", "train.log_every": 3})
    log_run(store, 0.60, seed=1, **{"output_dir": "b", "eval.batch_size": 64, "data.num_workers": 2})
    md, table = compare_table(store, tmp_path / "cmp")
    assert len(table) == 1 and table[0]["n"] == "2" and table[0]["ap_mean"] == "50.000000"
    constant = (tmp_path / "cmp" / "constant_keys.md").read_text()
    assert "`output_dir`" not in constant and "`missing." not in constant and "`seed`" not in constant
    assert md[0].startswith("Same in every run: ") and "keys, listed in constant_keys.md" in md[0]
    assert md[4] == "| η | #Image | #Text | DeLo AP ↑ | DeLo FG ↓ |"


def test_paper_layout_rows_column_groups_and_routing_columns(store, tmp_path):
    """The DeLo paper's Tables 2 and 3: eta blocks of text / image / both missing with their
    #Image / #Text, a column group per method in the paper's order (MAP before DeLo before
    the others), AP and FG, and a routing column only where a method routes by session."""
    metrics = {}
    for eta in (0.1, 0.9):
        for t, mtype in enumerate(("text", "image", "both")):
            for seed in (0, 1):
                base = {"data.eta": eta, "data.missing_type": mtype, "seed": seed}
                ap = round(0.1 * t + eta / 10 + 0.01 * seed, 4)
                metrics[eta, mtype, seed] = ap
                log_run(store, ap, 0.02, routing=0.8 + 0.1 * seed, **base)   # DeLo, routes
                log_run(store, ap / 2, 0.3, routing=float("nan"),           # MAP: shared head
                        section={"name": "map", "length": 16}, **base)
                if seed == 0:
                    log_run(store, 0.5, 0.01, routing=0.7, **base, **{"method.name": "lora"})
    md, table = compare_table(store, tmp_path / "cmp")
    # the methods' own sections (method.delo.*, method.map.*, method.lora.*) split nothing
    assert md[2].startswith("Column groups: method.name. Cells: ")
    assert md[4] == ("| η | #Image | #Text | MAP AP ↑ | MAP FG ↓ | DeLo AP ↑ | DeLo FG ↓ | "
                     "DeLo routing | DeLo-LoRA AP ↑ | DeLo-LoRA FG ↓ | DeLo-LoRA routing |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[6:]]
    assert [r[:3] for r in rows] == [["10%", "100%", "90%"], ["", "90%", "100%"], ["", "95%", "95%"],
                                     ["90%", "100%", "10%"], ["", "10%", "100%"], ["", "55%", "55%"]]
    import statistics
    for row, (eta, mtype) in zip(rows, [(e, m) for e in (0.1, 0.9) for m in ("text", "image", "both")]):
        aps = [100 * metrics[eta, mtype, s] for s in (0, 1)]
        mean, std = statistics.fmean(aps), statistics.stdev(aps)
        assert row[3:] == [f"{mean / 2:.2f} ± {std / 2:.2f} (n=2)", "30.00 ± 0.00 (n=2)",
                           f"{mean:.2f} ± {std:.2f} (n=2)", "2.00 ± 0.00 (n=2)",
                           "85.00 ± 7.07 (n=2)", "50.00 (n=1)", "1.00 (n=1)", "70.00 (n=1)"]
    # the long CSV: routing empty where nothing routes; the method's raw name
    by = {(r["eta"], r["missing_type"], r["method.name"]): r for r in table}
    assert len(table) == 18 and by["0.1", "text", "map"]["routing_mean"] == ""
    assert float(by["0.1", "text", "delo"]["routing_mean"]) == pytest.approx(85.0)
    assert [r["method.name"] for r in table[:3]] == ["map", "delo", "lora"]
    # the same table as CSV: numbers apart, eta on every row
    wide = list(csv.reader(open(tmp_path / "cmp" / "compare_table.csv")))
    assert wide[0] == ["eta", "missing_type", "both_ratio", "image_pct", "text_pct",
                       "MAP ap", "MAP ap std", "MAP fg", "MAP fg std", "MAP n",
                       "DeLo ap", "DeLo ap std", "DeLo fg", "DeLo fg std", "DeLo routing",
                       "DeLo routing std", "DeLo n", "DeLo-LoRA ap", "DeLo-LoRA ap std",
                       "DeLo-LoRA fg", "DeLo-LoRA fg std", "DeLo-LoRA routing",
                       "DeLo-LoRA routing std", "DeLo-LoRA n"]
    assert [r[:5] for r in wide[1:3]] == [["0.1", "text", "0.5", "100.000000", "90.000000"],
                                          ["0.1", "image", "0.5", "90.000000", "100.000000"]]
    assert float(wide[1][10]) == pytest.approx(100 * (metrics[0.1, "text", 0] + metrics[0.1, "text", 1]) / 2)
    assert (wide[1][9], wide[1][16], wide[1][23], wide[1][22]) == ("2", "2", "1", "")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_a_plugin_section_key_splits_only_the_runs_that_have_it(store, tmp_path):
    log_run(store, 0.40, **{"method.delo.factor_rank": 1})
    log_run(store, 0.50, **{"method.delo.factor_rank": 4})
    log_run(store, 0.30, **{"method.name": "lora"})
    md, table = compare_table(store, tmp_path / "cmp")
    assert "Column groups: method.name / method.delo.factor_rank." in md[2]
    assert md[4] == ("| η | #Image | #Text | DeLo / 1 AP ↑ | DeLo / 1 FG ↓ | DeLo / 4 AP ↑ | "
                     "DeLo / 4 FG ↓ | DeLo-LoRA AP ↑ | DeLo-LoRA FG ↓ |")
    assert [(r["method.name"], r["method.delo.factor_rank"], r["ap_mean"]) for r in table] == [
        ("delo", "1", "40.000000"), ("delo", "4", "50.000000"), ("lora", "", "30.000000")]


def test_hashes_are_short_in_the_table_and_whole_in_the_csv(store, tmp_path):
    import mlflow
    client = mlflow.MlflowClient(store)
    for sha, ap in (("a" * 64, 0.4), ("b" * 64, 0.6)):
        log_run(store, ap)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        run = client.search_runs([exp], order_by=["attributes.start_time DESC"])[0]
        client.set_tag(run.info.run_id, "data.manifest_sha256", sha)
    md, table = compare_table(store, tmp_path / "cmp")
    assert md[4] == ("| η | #Image | #Text | DeLo / aaaaaaaaaaaa AP ↑ | DeLo / aaaaaaaaaaaa FG ↓ | "
                     "DeLo / bbbbbbbbbbbb AP ↑ | DeLo / bbbbbbbbbbbb FG ↓ |")
    assert sorted(r["data.manifest_sha256"] for r in table) == ["a" * 64, "b" * 64]


def test_plot_axes_have_no_offset_notation(tmp_path):
    from matplotlib.axes import Axes
    from delo_dist.compare import build_table, plot
    run = lambda seed, ap: Run(seed, {"method.name": "delo", "data.eta": "0.5",  # noqa: E731
                                      "data.missing_type": "both", "data.both_ratio": "0.5"},
                               seed, "finished", ap, 0.1)
    offsets = []
    original = Axes.ticklabel_format
    def spy(self, **kw):
        offsets.append(kw.get("useOffset"))
        return original(self, **kw)
    Axes.ticklabel_format = spy
    try:
        plot(build_table([run("0", 0.123451), run("1", 0.123452)]), tmp_path / "c.png")
    finally:
        Axes.ticklabel_format = original
    assert offsets == [False, False] and (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_ablations_over_seeds_keep_each_seed_and_report_mean_and_std(shards, tmp_path):
    import json
    import statistics
    from delo_dist.ablations import run
    rows = run(str(REPO / "recipes" / "quickstart.yaml"),
               tiny_overrides(shards, tmp_path / "abl", **{"data.sessions": 2, "seed": 5}),
               only=["head_only"], seeds=2)
    saved = json.loads((tmp_path / "abl" / "ablations" / "results.json").read_text())
    assert saved == rows and rows[0]["n"] == 2
    per_seed = rows[0]["per_seed"]
    assert [p["seed"] for p in per_seed] == [5, 6]
    for p in per_seed:   # each seed's own run folder and metrics
        m = json.loads((tmp_path / "abl" / "ablations" / "head_only" / f"seed{p['seed']}" /
                        "metrics.json").read_text())
        assert p["ap"] == m["ap"]
    aps = [p["ap"] for p in per_seed]
    assert rows[0]["ap"] == pytest.approx(statistics.fmean(aps))
    assert rows[0]["ap_std"] == pytest.approx(statistics.stdev(aps))
    text = (tmp_path / "abl" / "ablations" / "table.md").read_text()
    assert f"{100 * rows[0]['ap']:.2f} ± {100 * rows[0]['ap_std']:.2f} (n=2)" in text
