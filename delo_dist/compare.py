"""Compare training runs from MLflow as the paper's tables do (DeLo Tables 2 and 3), over seeds.

    python -m delo_dist.compare [--tracking-uri URI] [--experiment NAME]... [--dataset D]
        [--method M]... [--tag KEY=VALUE]... [--out DIR] [--no-log]

Runs are grouped by their whole recipe: the flattened recipe each run logs as MLflow params,
less the keys that cannot change results (`config.result_neutral`), the seed, and values
the trainer derives from the recipe (`missing.*`, `params.*`), plus the data's identity
(`data.manifest_sha256`, tag or param, when logged). Runs that differ in anything but the seed
are never merged. Keys equal wherever set are counted above the table and listed in
constant_keys.md (a recipe has about 80). A key of a plug-in's own section (`method.delo.*`,
`backbone.vilt.*`) is no setting of a run that has none of that section (a LoRA run has no
`method.delo.*`): it splits groups only where runs that have it differ. The keys that differ
lay it out as the DeLo paper's Tables 2 and 3:
  - rows: eta, then per eta the missing types text, image, both, each with the % of samples
    that keep an image (#Image) and a text (#Text) (both_ratio only when it differs);
  - column groups: method.name in the paper's order (MAP, MSP, L2P, DualPrompt, CODA-Prompt,
    RebQ, DeLo, then the others by name), then every other differing key (e.g. method x
    backbone), a group per combination: AP and FG, and the routing accuracy (task
    identification, final row) for a method that routes by session; methods that route
    nothing (one shared head) have no routing column.
A cell is `mean ± std (n=N)` over the seeds of the FINISHED runs (percent, sample standard
deviation); runs still running, failed or killed are named in the cell, never averaged.
The runs' performance metric (tag `metric`: accuracy, macro_f1/seen or macro_f1/session)
ends the table; runs that mix metrics are refused.
Writes under --out: compare.md (that table), compare_table.csv (the same rows and columns,
mean, std and n apart), compare.csv (one line per cell: the differing keys, mean, std, n,
seeds), constant_keys.md and compare.png (AP and FG against eta, a panel per missing type,
std error bars; hashes such as the data's manifest sha256 cut to 12 digits in the table and
the plot, whole in the CSVs and constant_keys.md);
prints the table and logs the files to a summary run (tag kind=compare-summary, which
comparisons skip).
Runs logged without recipe params (not by this trainer) are keyed by their tags alone and
shown with `?` for the keys they lack.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from delo_dist.metrics import mean_std
from delo_dist.config import result_neutral

TYPE_ORDER = {"text": 0, "image": 1, "both": 2}
# the DeLo paper's column order (Tables 2 and 3, CODA-Prompt beside its kin), then the rest
METHOD_ORDER = ("map", "msp", "l2p", "dualprompt", "coda_prompt", "rebq", "delo")
DISPLAY = {"map": "MAP", "msp": "MSP", "l2p": "L2P", "dualprompt": "DualPrompt",
           "coda_prompt": "CODA-Prompt", "rebq": "RebQ", "delo": "DeLo", "lora": "DeLo-LoRA",
           "seq_lora": "seq-LoRA", "head_only": "head-only", "mail": "MAIL", "seq_mail": "seq-MAIL",
           "mora": "MoRA", "seq_mora": "seq-MoRA"}
CONSTANT_FILE = "constant_keys.md"
FILES = ("compare.md", "compare_table.csv", "compare.csv", CONSTANT_FILE, "compare.png")
NOT_SET = None  # a plug-in section key of a run without that section: no value, not unknown
SUMMARY_TAG = ("kind", "compare-summary")
ROW_KEYS = ("data.eta", "data.missing_type", "data.both_ratio")
DERIVED_PREFIXES = ("missing.", "params.")        # logged by the trainer, computed from the recipe
DATA_ID = "data.manifest_sha256"
UNKNOWN = "?"
# tag -> recipe key, for runs without recipe params
TAG_KEYS = {"method": "method.name", "eta": "data.eta", "missing_type": "data.missing_type",
            "both_ratio": "data.both_ratio", "dataset": "data.dataset"}


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
    config: dict                 # result-shaping recipe keys -> value (strings, as logged)
    seed: str
    status: str                  # MLflow status, lower case; "finished" only with final metrics
    ap: float | None = None      # final_ap, fraction
    fg: float | None = None
    metric: str | None = None    # tag "metric": accuracy, macro_f1/seen or macro_f1/session
    routing: float | None = None  # final_routing_accuracy; None where nothing routes (NaN)

    def get(self, key: str) -> str | None:
        """The run's value of a key; UNKNOWN if not logged; NOT_SET for a key of a plug-in
        section (three parts or more: `method.delo.rank`) when the run has no key of that
        section at all (another method's settings)."""
        if key in self.config:
            return self.config[key]
        parts = key.split(".")
        if len(parts) > 2:
            section = ".".join(parts[:2]) + "."
            if not any(k.startswith(section) for k in self.config):
                return NOT_SET
        return UNKNOWN


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished"]

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) in percent over the finished runs that have the metric; std
        None when n < 2."""
        return mean_std(None if getattr(r, metric) is None else 100 * getattr(r, metric)
                        for r in self.done)

    def others(self) -> str:
        counts = Counter(r.status for r in self.runs if r.status != "finished")
        return ", ".join(s if c == 1 else f"{c} {s}" for s, c in sorted(counts.items()))

    def text(self, metric: str) -> str:
        if not self.runs:
            return "-"
        mean, std, n = self.stats(metric)
        rest = self.others()
        if mean is None:
            return rest or "-"   # finished runs without this metric (routing where nothing routes)
        seeds = [r.seed for r in self.done]
        notes = [f"n={n}"] + (["repeated seed"] if len(set(seeds)) < len(seeds) else [])
        notes += [rest] if rest else []
        return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" ({'; '.join(notes)})"


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


def run_config(params: dict, tags: dict) -> tuple[dict, str]:
    """(the keys that shape results, the seed) of one run, from its params (else its tags)."""
    if params:
        config = {k: v for k, v in params.items()
                  if k != "seed" and not result_neutral(k) and not k.startswith(DERIVED_PREFIXES)}
        seed = params.get("seed", tags.get("seed", UNKNOWN))
    else:
        config = {key: tags[tag] for tag, key in TAG_KEYS.items() if tag in tags}
        seed = tags.get("seed", UNKNOWN)
    if DATA_ID in tags or DATA_ID in params:
        config[DATA_ID] = params.get(DATA_ID, tags.get(DATA_ID))
    config.setdefault("data.both_ratio", "0.5")
    return config, seed


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
        config, seed = run_config(r.data.params, t)
        routing = m.get("final_routing_accuracy")
        out.append(Run(r.info.run_id, config, seed, status, m.get("final_ap"), m.get("final_fg"),
                       t.get("metric"), None if routing is None or math.isnan(routing) else routing))
    return out


# ---------------------------------------------------------------- the table
@dataclass
class Table:
    constant: dict               # key -> value shared by every run that has the key
    group_keys: list[str]        # differing keys that make column groups (method.name first)
    groups: list[tuple]          # their value combinations, in the paper's method order
    rows: list[dict]             # setting + {"cells": {group: Cell}}
    show_both_ratio: bool
    routed: set = field(default_factory=set)   # groups whose finished runs route by session


def _num_or_str(v):
    if v is NOT_SET:
        return (2, 0.0, "")
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def _group_order(group: tuple) -> list:
    """The paper's methods first, in its order, then the others by name; then the other keys."""
    method = group[0]
    first = (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), str(method))
    return [first] + [_num_or_str(v) for v in group[1:]]


def build_table(runs: list[Run]) -> Table:
    keys = sorted({k for r in runs for k in r.config})
    values = {k: {r.get(k) for r in runs} - {NOT_SET} for k in keys}
    differing = [k for k in keys if len(values[k]) > 1]
    constant = {k: next(iter(values[k])) for k in keys if len(values[k]) == 1}
    group_keys = ["method.name"] + [k for k in differing if k not in ROW_KEYS and k != "method.name"]
    groups = sorted({tuple(r.get(k) for k in group_keys) for r in runs}, key=_group_order)
    rows: dict[tuple, dict] = {}
    for r in runs:
        eta, mtype, br = (r.get(k) for k in ROW_KEYS)
        key = (_num_or_str(eta), TYPE_ORDER.get(mtype, 9), mtype, _num_or_str(br))
        if key not in rows:
            try:
                image, text = modality_pct(mtype, float(eta), float(br))
            except ValueError:
                image = text = None
            rows[key] = {"eta": eta, "missing_type": mtype, "both_ratio": br, "image": image,
                         "text": text, "cells": defaultdict(Cell)}
        rows[key]["cells"][tuple(r.get(k) for k in group_keys)].runs.append(r)
    ordered = [rows[k] for k in sorted(rows)]
    routed = {g for g in groups for row in ordered if g in row["cells"]
              and any(r.routing is not None for r in row["cells"][g].done)}
    return Table(constant, group_keys, groups, ordered, "data.both_ratio" in differing, routed)


def group_label(table: Table, group: tuple) -> str:
    """`DeLo`, `MAIL / clip`: the method's name as papers write it, then the other keys' values
    (a key the group's runs do not have is left out)."""
    method, *rest = group
    return " / ".join([DISPLAY.get(method, str(method))] + [short(str(v)) for v in rest
                                                            if v is not NOT_SET])


def short(value: str) -> str:
    """A 40- or 64-digit hex hash (a sha1 or sha256) cut to 12 digits; other values as they are."""
    return value[:12] if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", value) else value


def columns(table: Table, group: tuple) -> tuple[str, ...]:
    """A group's metrics: AP and FG, and routing accuracy where the method routes by session."""
    return ("ap", "fg", "routing") if group in table.routed else ("ap", "fg")


HEADER = {"ap": "AP ↑", "fg": "FG ↓", "routing": "routing"}


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{round(v, 2):g}%"


def _eta(v: str) -> str:
    try:
        return f"{100 * float(v):g}%"
    except ValueError:
        return v


def to_markdown(table: Table) -> str:
    """The paper's layout: eta written once per block of missing types, #Image and #Text the
    % of samples that keep that modality, a column group per method."""
    lines = []
    if table.constant:
        lines.append(f"Same in every run: {len(table.constant)} keys, listed in {CONSTANT_FILE}.\n")
    lines.append(f"Column groups: {' / '.join(table.group_keys)}. Cells: mean ± std over seeds "
                 "(percent, sample std), n finished runs; unfinished runs named, never averaged. "
                 "Rows: eta, then text, image and both missing; #Image / #Text: % of samples "
                 "that keep it. routing: task identification accuracy, for methods that route by "
                 "session.\n")
    head = ["η", "#Image", "#Text"] + (["both_ratio"] if table.show_both_ratio else [])
    head += [f"{group_label(table, g)} {HEADER[m]}" for g in table.groups for m in columns(table, g)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = None
    for row in table.rows:
        cells = ["" if row["eta"] == previous else _eta(row["eta"]), _pct(row["image"]), _pct(row["text"])]
        previous = row["eta"]
        cells += [row["both_ratio"]] if table.show_both_ratio else []
        cells += [row["cells"][g].text(m) for g in table.groups for m in columns(table, g)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(v) -> str:
    return "" if v is NOT_SET else v


def write_csv(table: Table, path: Path) -> None:
    """One line per (setting, column group) with runs: the differing keys, then for AP and FG
    the mean, std and n over seeds (percent), the seeds, the unfinished runs, and routing
    accuracy (empty where the method routes nothing)."""
    head = ["eta", "missing_type", "both_ratio", "image_pct", "text_pct", *table.group_keys,
            "ap_mean", "ap_std", "fg_mean", "fg_std", "n", "seeds", "unfinished",
            "routing_mean", "routing_std"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in table.rows:
            for g in table.groups:
                c = row["cells"].get(g)
                if c is None or not c.runs:
                    continue
                ap, ap_std, n = c.stats("ap")
                fg, fg_std, _ = c.stats("fg")
                rt, rt_std, _ = c.stats("routing")
                w.writerow([row["eta"], row["missing_type"], row["both_ratio"], _num(row["image"]),
                            _num(row["text"]), *map(_value, g), _num(ap), _num(ap_std), _num(fg),
                            _num(fg_std), n, " ".join(sorted(r.seed for r in c.done)), c.others(),
                            _num(rt), _num(rt_std)])


def write_table_csv(table: Table, path: Path) -> None:
    """compare.md's rows and columns as CSV: per column group, each metric's mean and std
    (percent) and n, numbers only (eta on every row)."""
    head = ["eta", "missing_type", "both_ratio", "image_pct", "text_pct"]
    for g in table.groups:
        label = group_label(table, g)
        head += [f"{label} {m}{x}" for m in columns(table, g) for x in ("", " std")] + [f"{label} n"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in table.rows:
            line = [row["eta"], row["missing_type"], row["both_ratio"], _num(row["image"]), _num(row["text"])]
            for g in table.groups:
                cell = row["cells"].get(g) or Cell()
                stats = [cell.stats(m) for m in columns(table, g)]
                line += [_num(x) for mean, std, _ in stats for x in (mean, std)] + [len(cell.done)]
            w.writerow(line)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def constant_markdown(table: Table) -> str:
    rows = [f"| `{k}` | `{v}` |" for k, v in sorted(table.constant.items())]
    return "\n".join([f"Keys with one value in all {table_runs(table)} runs compared (wherever "
                      "set: a plug-in's own keys in the runs of that plug-in):", "",
                      "| key | value |", "|---|---|", *rows]) + "\n"


def table_runs(table: Table) -> int:
    return sum(len(c.runs) for row in table.rows for c in row["cells"].values())


def plot(table: Table, path: Path) -> None:
    """AP (top) and FG (bottom) against eta, a panel per missing type (text, image, both): a
    colour per method, a line style per value of the other group keys (e.g. the backbone);
    std error bars; one y scale per row; plain axis labels (no offset notation); seeds and n
    in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    types = sorted({r["missing_type"] for r in table.rows}, key=lambda t: TYPE_ORDER.get(t, 9))
    fig, axes = plt.subplots(2, len(types), figsize=(3.2 + 3.8 * len(types), 7), squeeze=False,
                             sharex=True, sharey="row")   # one scale a metric: types compare
    firsts = list(dict.fromkeys(g[0] for g in table.groups))
    rests = sorted({g[1:] for g in table.groups}, key=lambda r: [_num_or_str(v) for v in r])
    lines = ["-", "--", ":", "-."]
    colours = plt.get_cmap("tab10" if len(firsts) <= 10 else "tab20")
    ns, seeds = [], set()
    for j, mt in enumerate(types):
        for g in table.groups:
            pts = []
            for r in table.rows:
                c = r["cells"].get(g)
                if r["missing_type"] == mt and c is not None and c.done and _num_or_str(r["eta"])[0] == 0:
                    pts.append((100 * float(r["eta"]), c))
            for i, metric in enumerate(("ap", "fg")):
                stats = [(x, c.stats(metric)) for x, c in pts]
                stats = [(x, s) for x, s in stats if s[0] is not None]
                if not stats:
                    continue
                ns += [s[2] for _, s in stats]
                seeds.update(r.seed for _, c in pts for r in c.done)
                axes[i][j].errorbar([x for x, _ in stats], [s[0] for _, s in stats],
                                    yerr=[s[1] or 0.0 for _, s in stats], fmt="o",
                                    linestyle=lines[rests.index(g[1:]) % len(lines)],
                                    color=colours(firsts.index(g[0])), capsize=3,
                                    label=group_label(table, g))
        axes[0][j].set_title(f"{mt} missing")
    for i, name in enumerate(("AP (%)", "FG (%)")):
        for ax in axes[i]:
            ax.set_ylabel(name)
            if i == 1:
                ax.set_xlabel("missing rate eta (%)")
            ax.ticklabel_format(axis="both", style="plain", useOffset=False)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center left",
                   bbox_to_anchor=(1.0, 0.5))
    n = (f"n = {min(ns)}" if min(ns) == max(ns) else f"n = {min(ns)}-{max(ns)}") if ns else "n = 0"
    fig.suptitle(f"Finished runs: mean ± sample std over seeds {', '.join(sorted(seeds, key=_num_or_str))}, "
                 f"{n} a point ({' / '.join(table.group_keys)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m delo_dist.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db")
    p.add_argument("--experiment", action="append", default=[], help="repeatable; default: all")
    p.add_argument("--dataset")
    p.add_argument("--method", action="append", default=[], help="repeatable; default: all")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable, e.g. --tag slurm_array_job_id=42 --tag sweep=compare_all")
    p.add_argument("--out", default="outputs/compare", help="folder for " + ", ".join(FILES))
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
    table = build_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table) + f"\nperformance: {metrics[0] if metrics else 'unrecorded'}\n"
    (out / "compare.md").write_text(md)
    (out / CONSTANT_FILE).write_text(constant_markdown(table))
    write_csv(table, out / "compare.csv")
    write_table_csv(table, out / "compare_table.csv")
    plot(table, out / "compare.png")
    print(md)
    print(f"{len(runs)} runs; wrote {', '.join(str(out / n) for n in FILES)}")
    if not args.no_log:
        mlflow.set_tracking_uri(uri)
        exp = args.summary_experiment or (args.experiment[0] if len(args.experiment) == 1
                                          else "delo-dist-compare")
        mlflow.set_experiment(exp)
        filters = {"filter." + k: v for k, v in {"dataset": args.dataset, "method": ",".join(args.method),
                                                 **args.tags}.items() if v}
        with mlflow.start_run(run_name="compare", tags={SUMMARY_TAG[0]: SUMMARY_TAG[1], **filters}) as run:
            mlflow.log_param("n_runs", len(runs))
            for name in FILES:
                mlflow.log_artifact(str(out / name))
        print(f"logged to summary run {run.info.run_id} in experiment {exp!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
