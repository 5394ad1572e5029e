"""Compare training runs from MLflow as the paper's tables do (DeLo Tables 2 and 3).

    python -m delo_dist.compare [--tracking-uri URI] [--experiment NAME]... [--dataset D]
        [--method M]... [--tag KEY=VALUE]... [--out DIR] [--no-log]

One row per missing setting (eta, % of samples with an image, % with a text), then AP and FG
per method, in percent with two decimals. A cell averages the FINISHED runs of its setting
and method (`(n=3)` when more than one); runs still running, failed or killed are named in
the cell and never averaged in. The runs' performance metric (tag `metric`: accuracy,
macro_f1/seen or macro_f1/session) ends the table; runs that mix metrics are refused.
Writes compare.md, compare.csv and compare.png (AP and FG against eta) under --out, prints
the table, and logs the three files to a summary run (tagged kind=compare-summary, which
later comparisons skip).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TYPE_ORDER = {"text": 0, "image": 1, "both": 2}
SUMMARY_TAG = ("kind", "compare-summary")


def modality_pct(missing_type: str, eta: float, both_ratio: float) -> tuple[float, float]:
    """(% samples with an image, % with a text). eta of the samples are incomplete; in `both`,
    both_ratio of the incomplete ones lose the image and the rest lose the text."""
    if missing_type == "text":
        return 100.0, 100 * (1 - eta)
    if missing_type == "image":
        return 100 * (1 - eta), 100.0
    if missing_type == "both":
        return 100 * (1 - eta * both_ratio), 100 * (1 - eta * (1 - both_ratio))
    raise ValueError(f"unknown missing type {missing_type!r}")


@dataclass
class Run:
    run_id: str
    method: str
    missing_type: str
    eta: float
    both_ratio: float
    status: str                  # MLflow status, lower case; "finished" only with final metrics
    ap: float | None = None      # final_ap, fraction
    fg: float | None = None
    metric: str | None = None    # tag "metric": accuracy, macro_f1/seen or macro_f1/session


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished"]

    def mean(self, metric: str) -> float | None:
        vals = [getattr(r, metric) for r in self.done]
        return 100 * sum(vals) / len(vals) if vals else None

    def others(self) -> str:
        counts = Counter(r.status for r in self.runs if r.status != "finished")
        return ", ".join(s if c == 1 else f"{c} {s}" for s, c in sorted(counts.items()))

    def text(self, metric: str) -> str:
        if not self.runs:
            return "-"
        m, n, rest = self.mean(metric), len(self.done), self.others()
        if m is None:
            return rest
        notes = ([f"n={n}"] if n > 1 else []) + ([rest] if rest else [])
        return f"{m:.2f}" + (f" ({'; '.join(notes)})" if notes else "")


# ---------------------------------------------------------------- reading MLflow
def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    default = Path("outputs/mlflow.db")
    if default.is_file():  # the trainer's default store for recipes writing under outputs/
        return f"sqlite:///{default.resolve()}"
    raise SystemExit("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")


def experiment_ids(client, names: list[str]) -> list[str]:
    if not names:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments())
            raise SystemExit(f"no experiment named {name!r} (known: {known})")
        ids.append(exp.experiment_id)
    return ids


def load_runs(client, exp_ids: list[str], dataset: str | None = None,
              methods: list[str] | None = None, tags: dict | None = None) -> list[Run]:
    """Training runs matching the filters (tags are matched by the server)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in {**({"dataset": dataset} if dataset else {}),
                                                  **(tags or {})}.items()]
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, " and ".join(clauses), max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    out = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        if t.get(SUMMARY_TAG[0]) == SUMMARY_TAG[1] or "eta" not in t or "missing_type" not in t:
            continue  # a summary run or not a training run of this project
        if methods and t.get("method") not in methods:
            continue
        status = r.info.status.lower()
        if status == "finished" and "final_ap" not in m:
            status = "no final metrics"
        out.append(Run(r.info.run_id, t.get("method", "?"), t["missing_type"], float(t["eta"]),
                       float(t.get("both_ratio", 0.5)), status, m.get("final_ap"), m.get("final_fg"),
                       t.get("metric")))
    return out


# ---------------------------------------------------------------- the table
def build_table(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Methods (sorted) and rows sorted by eta then missing type; each row has a Cell per method.
    both_ratio only matters for `both`, so it splits rows only there."""
    methods = sorted({r.method for r in runs})
    rows: dict[tuple, dict] = {}
    for r in runs:
        br = r.both_ratio if r.missing_type == "both" else None
        key = (r.eta, TYPE_ORDER.get(r.missing_type, 9), r.missing_type, br)
        if key not in rows:
            image, text = modality_pct(r.missing_type, r.eta, r.both_ratio)
            rows[key] = {"eta": r.eta, "missing_type": r.missing_type, "both_ratio": br,
                         "image": image, "text": text, "cells": defaultdict(Cell)}
        rows[key]["cells"][r.method].runs.append(r)
    return methods, [rows[k] for k in sorted(rows, key=lambda k: k[:3] + (k[3] or 0,))]


def to_markdown(methods: list[str], rows: list[dict]) -> str:
    head = ["eta", "image %", "text %"] + [f"{m} {x}" for m in methods for x in ("AP", "FG")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{100 * row['eta']:g}%", f"{row['image']:.2f}", f"{row['text']:.2f}"]
        cells += [row["cells"][m].text(x) for m in methods for x in ("ap", "fg")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(methods: list[str], rows: list[dict], path: Path) -> None:
    """Numbers only (percent, mean of finished runs); n and the unfinished runs beside them."""
    head = ["eta", "missing_type", "both_ratio", "image_pct", "text_pct"]
    head += [f"{m}_{x}" for m in methods for x in ("ap", "fg", "n", "unfinished")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in rows:
            vals = [row["eta"], row["missing_type"], row["both_ratio"] if row["both_ratio"] is not None
                    else "", f"{row['image']:.2f}", f"{row['text']:.2f}"]
            for m in methods:
                c = row["cells"][m]
                vals += [_num(c.mean("ap")), _num(c.mean("fg")), len(c.done), c.others()]
            w.writerow(vals)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def plot(methods: list[str], rows: list[dict], path: Path) -> None:
    """AP and FG against eta: a colour per method, a line style per missing type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"text": "o-", "image": "s--", "both": "^:"}
    for ci, m in enumerate(methods):
        for mt in sorted({r["missing_type"] for r in rows}, key=lambda t: TYPE_ORDER.get(t, 9)):
            pts = [(100 * r["eta"], r["cells"][m]) for r in rows if r["missing_type"] == mt]
            pts = [(x, c) for x, c in pts if c.done]
            if not pts:
                continue
            for ax, metric in zip(axes, ("ap", "fg")):
                ax.plot([x for x, _ in pts], [c.mean(metric) for _, c in pts], styles.get(mt, "x-"),
                        color=f"C{ci}", label=f"{m} ({mt} missing)")
    for ax, name in zip(axes, ("AP (%)", "FG (%)")):
        ax.set_xlabel("missing rate eta (%)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Finished runs; mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m delo_dist.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db")
    p.add_argument("--experiment", action="append", default=[], help="repeatable; default: all")
    p.add_argument("--dataset")
    p.add_argument("--method", action="append", default=[], help="repeatable; default: all")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable, e.g. --tag slurm_array_job_id=42 --tag seed=0")
    p.add_argument("--out", default="outputs/compare", help="folder for compare.{md,csv,png}")
    p.add_argument("--summary-experiment", help="where the summary run goes (default: the one "
                   "--experiment given, else delo-dist-compare)")
    p.add_argument("--no-log", action="store_true", help="do not log a summary run")
    args = p.parse_args(argv)
    bad = [t for t in args.tag if "=" not in t]
    if bad:
        p.error(f"--tag wants KEY=VALUE, got {bad}")
    args.tags = dict(t.split("=", 1) for t in args.tag)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = resolve_uri(args.tracking_uri)
    client = MlflowClient(uri)
    runs = load_runs(client, experiment_ids(client, args.experiment), args.dataset,
                     args.method, args.tags)
    if not runs:
        print(f"no training runs match these filters in {uri}", file=sys.stderr)
        return 1
    metrics = sorted({r.metric for r in runs if r.metric})
    if len(metrics) > 1:  # macro-F1 over seen classes and over a session's are not comparable
        print(f"these runs score performance differently ({', '.join(metrics)}): select one "
              "with --tag metric=...", file=sys.stderr)
        return 2
    methods, rows = build_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(methods, rows) + f"\nperformance: {metrics[0] if metrics else 'unrecorded'}\n"
    (out / "compare.md").write_text(md)
    write_csv(methods, rows, out / "compare.csv")
    plot(methods, rows, out / "compare.png")
    print(md)
    print(f"{len(runs)} runs; wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    if not args.no_log:
        mlflow.set_tracking_uri(uri)
        exp = args.summary_experiment or (args.experiment[0] if len(args.experiment) == 1
                                          else "delo-dist-compare")
        mlflow.set_experiment(exp)
        filters = {"filter." + k: v for k, v in {"dataset": args.dataset, "method": ",".join(args.method),
                                                 **args.tags}.items() if v}
        with mlflow.start_run(run_name="compare", tags={SUMMARY_TAG[0]: SUMMARY_TAG[1], **filters}) as run:
            mlflow.log_param("n_runs", len(runs))
            for name in ("compare.md", "compare.csv", "compare.png"):
                mlflow.log_artifact(str(out / name))
        print(f"logged to summary run {run.info.run_id} in experiment {exp!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
