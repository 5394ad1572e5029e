"""Ablations: variants of one recipe trained on the same data and seeds; one table.

    python -m delo_dist.ablations RECIPE [key=value ...] [--only V,... | --preset P] [--seeds N]
    python -m delo_dist.ablations --benchmarks cue,content [key=value ...] [--preset P] [--seeds N]

Variants are sets of recipe overrides (`VARIANTS`): DeLo's ablations (the DeLo paper's
Tables 4 and 6), the task-identification sources, the lower bounds, and the MAIL paper's
ablations (Tables 1-3: MAIL-l / -a / -b, Top-1 / Top-2 / SoftMerge, square / increasing /
decreasing allocation). `--preset` names a group (`PRESETS`): `delo`, `task_id`, `mail`.
`--benchmarks` runs them on the synthetic benchmarks by name (`BENCHMARKS`: cue, content)
instead of one RECIPE; the overrides then apply to every benchmark.

Each variant trains in its own output folder under <output_dir>/ablations/[<benchmark>/]
<variant> (with --seeds N > 1: .../<variant>/seed<S> for seeds S = seed .. seed+N-1) and logs
its own MLflow run per seed (tag `ablation`). Every cell is mean ± sample std (n) over the
seeds (`mean_std`). The tables (Markdown: AP, FG, oracle AP and FG, task-routing accuracy,
wall time; then routing accuracy by availability) are written beside the variants'
folders, <output_dir>/ablations/[<benchmark>/]table.md (results.json keeps every seed's
values), and printed, all benchmarks in one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from delo_dist import plugins
from delo_dist.config import load_recipe
from delo_dist.metrics import mean_std

# The DeLo paper's Tables 4 and 6 as recipe overrides, and the lower bounds users ask for.
# ${rank}: the recipe's DeLo rank (the LoRA baselines get the same rank).
DELO_VARIANTS: dict[str, dict] = {
    "delo": {},
    "delo_lora": {"method.name": "lora", "method.lora.rank": "${rank}"},
    "no_cross_modal_guide": {"method.delo.cross_modal_guide": False},
    "unified_pool": {"method.delo.modality_pools": False},
    "only_ce": {"method.delo.lambda_align": 0.0, "method.delo.lambda_con": 0.0},
    "no_align": {"method.delo.lambda_align": 0.0},
    "no_con": {"method.delo.lambda_con": 0.0},
    "factor_rank_1": {"method.delo.factor_rank": 1},    # Eq. 2 and 4 read literally
    "seq_lora": {"method.name": "seq_lora", "method.lora.rank": "${rank}"},
    "head_only": {"method.name": "head_only"},
}
# Every registered task-identification source (built-in, installed or the recipe's own).
TASK_ID_VARIANTS: dict[str, dict] = {f"task_id_{name}": {"task_id.source": name}
                                     for name in plugins.names("task_id")}

# The MAIL paper's ablations, each the paper's default (MAIL-b, top-2, square: spelled out,
# so a recipe's own method.mail keys cannot leak in) with one setting changed.
MAIL_DEFAULT = {"method.name": "mail", "method.mail.variant": "both", "method.mail.routing": "top_k",
                "method.mail.top_k": 2, "method.mail.allocation": "square"}
MAIL_VARIANTS: dict[str, dict] = {name: {**MAIL_DEFAULT, **change} for name, change in {
    "mail": {},                                                  # = mail_b, mail_top2, mail_square
    "mail_l": {"method.mail.variant": "linear"},                 # Table 1: MAIL-l
    "mail_a": {"method.mail.variant": "attention"},              # Table 1: MAIL-a
    "mail_top1": {"method.mail.top_k": 1},                       # Table 2: Top-1
    "mail_soft": {"method.mail.routing": "soft_merge"},          # Table 2: SoftMerge
    "mail_increasing": {"method.mail.allocation": "increasing"},  # Table 3: more experts up
    "mail_decreasing": {"method.mail.allocation": "decreasing"},  # Table 3: fewer experts up
}.items()}
# The paper's names for its default, trained once under the name `mail`.
ALIASES = {"mail_b": "mail", "mail_top2": "mail", "mail_square": "mail"}

VARIANTS: dict[str, dict] = {**DELO_VARIANTS, **TASK_ID_VARIANTS, **MAIL_VARIANTS}
PRESETS: dict[str, list[str]] = {
    "delo": list(DELO_VARIANTS),
    "task_id": list(TASK_ID_VARIANTS),
    "mail": list(MAIL_VARIANTS),
}
BENCHMARKS = {"cue": "recipes/quickstart.yaml", "content": "recipes/quickstart_content.yaml",
              "shared": "recipes/quickstart_shared.yaml"}   # shared: identification is hard

METRICS = ("ap", "fg", "oracle_ap", "oracle_fg", "routing_accuracy", "wall_time_s")
AVAILABILITY = ("complete", "text_only", "image_only")   # routing accuracy by what a sample has


def overrides_for(variant: str, rank: int) -> list[str]:
    return [f"{k}={rank if v == '${rank}' else v}" for k, v in VARIANTS[variant].items()]


def resolve(names: list[str]) -> list[str]:
    """Variant names (aliases resolved, each trained once, in the order given); unknown ones
    raise ValueError naming the known ones."""
    unknown = [n for n in names if n not in VARIANTS and n not in ALIASES]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)} "
                         f"(and {', '.join(f'{a} = {v}' for a, v in ALIASES.items())})")
    return list(dict.fromkeys(ALIASES.get(n, n) for n in names))


def _metrics(m: dict) -> dict:
    avail = (m.get("routing_by_availability") or {}).get("overall", {})
    return {**{k: m[k] for k in METRICS}, **{k: avail.get(k) for k in AVAILABILITY}}


def run(recipe_path: str, overrides: list[str], only: list[str] | None = None,
        seeds: int = 1, benchmark: str | None = None) -> list[dict]:
    """Train every variant for `seeds` seeds; rows hold each metric's mean (`ap`), sample std
    (`ap_std`, None for one seed), its n (`ap_n`), the row's n, and the per-seed values
    (`per_seed`). `benchmark` names the recipe in the rows and adds a folder level. The
    folder's table.md and results.json are rewritten after each variant."""
    from delo_dist.training.trainer import Trainer
    base = load_recipe(recipe_path, overrides)
    root = Path(base.output_dir) / "ablations"
    folder = root / benchmark if benchmark else root
    uri = base.tracking.uri or "sqlite:///" + str(root.resolve() / "mlflow.db")
    rows = []
    for name in resolve(only or list(VARIANTS)):
        per_seed = []
        for seed in range(base.seed, base.seed + seeds):
            out = folder / name if seeds == 1 else folder / name / f"seed{seed}"
            tags = f"{{ablation: {name}" + (f", benchmark: {benchmark}}}" if benchmark else "}")
            extra = overrides_for(name, getattr(base.method.settings, "rank", 4)) + [
                f"seed={seed}", f"output_dir={out}", f"tracking.tags={tags}", f"tracking.uri={uri}"]
            recipe = load_recipe(recipe_path, overrides + extra)
            if Trainer(recipe).run() != 0:
                raise SystemExit(f"variant {name} (seed {seed}) stopped before the end")
            per_seed.append({"seed": seed, **_metrics(json.loads((out / "metrics.json").read_text()))})
        row = {"variant": name, "n": len(per_seed), "per_seed": per_seed}
        if benchmark:
            row = {"benchmark": benchmark, **row}
        for k in METRICS + AVAILABILITY:
            row[k], row[f"{k}_std"], row[f"{k}_n"] = mean_std(p[k] for p in per_seed)
        rows.append(row)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(table(rows))
        (folder / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def cell(row: dict, key: str, scale: float = 100, digits: int = 2) -> str:
    """mean ± std (n=N) of one metric, in percent by default; '-' when no seed has it."""
    if row.get(key) is None:
        return "-"
    std = row.get(f"{key}_std")
    text = f"{scale * row[key]:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")
    return text + f" (n={row.get(f'{key}_n', row.get('n', 1))})"


def table(rows: list[dict]) -> str:
    """The main table, then routing accuracy by availability (`text_only`: image missing)."""
    bench = any("benchmark" in r for r in rows)
    lead = (lambda r: f"| {r.get('benchmark', '')} | {r['variant']} |") if bench else (  # noqa: E731
        lambda r: f"| {r['variant']} |")
    head = "| benchmark | variant |" if bench else "| variant |"
    rule = "|---|---|" if bench else "|---|"
    lines = [head + " AP | FG | oracle AP | oracle FG | routing acc. | wall (s) |",
             rule + "---|---|---|---|---|---|"]
    lines += [f"{lead(r)} {cell(r, 'ap')} | {cell(r, 'fg')} | {cell(r, 'oracle_ap')} | "
              f"{cell(r, 'oracle_fg')} | {cell(r, 'routing_accuracy', digits=1)} | "
              f"{r['wall_time_s']:.0f} |" for r in rows]
    lines += ["", "Routing accuracy by availability:", "",
              head + " routing | complete | text-only | image-only |", rule + "---|---|---|---|"]
    lines += [f"{lead(r)} {cell(r, 'routing_accuracy', digits=1)} | " +
              " | ".join(cell(r, k, digits=1) for k in AVAILABILITY) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("args", nargs="*", metavar="RECIPE [key=value ...]",
                   help="a recipe, then overrides (with --benchmarks: overrides only)")
    p.add_argument("--benchmarks", help=f"comma-separated names from {list(BENCHMARKS)}, "
                                        "run one after another instead of RECIPE")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(VARIANTS)} "
                                  f"(aliases: {','.join(ALIASES)})")
    p.add_argument("--preset", choices=list(PRESETS), help="a group of variants: " + "; ".join(
        f"{k}: {','.join(v)}" for k, v in PRESETS.items()))
    p.add_argument("--seeds", type=int, default=1,
                   help="train each variant with seeds seed .. seed+N-1 (the recipe's seed first)")
    p.add_argument("--identifiers", help="instead of variants: train each (benchmark, seed) once "
                   "and refit these task identifiers on it (names or groups of "
                   "delo_dist/identification.py: sources, analytic)")
    p.add_argument("--identifier", action="append", default=[],
                   help="with --identifiers, one more: NAME:task_id.key=value[,key=value]")
    a = p.parse_intermixed_args(argv)   # overrides may come after the options
    if a.seeds < 1:
        p.error("--seeds wants an int >= 1")
    if a.only and a.preset:
        p.error("--only and --preset choose the variants: give one of them")
    if a.benchmarks:
        names = a.benchmarks.split(",")
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")
        recipes, overrides = {n: BENCHMARKS[n] for n in names}, a.args
    elif not a.args:
        p.error("give a RECIPE, or --benchmarks")
    else:
        recipes, overrides = {None: a.args[0]}, a.args[1:]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"overrides are key=value, got {bad}" +
                (" (with --benchmarks, give no RECIPE)" if a.benchmarks else ""))
    if a.identifiers:
        return identification_tables(recipes, overrides, a)
    only = PRESETS[a.preset] if a.preset else a.only.split(",") if a.only else None
    try:
        resolve(only or [])
    except ValueError as e:
        p.error(str(e))
    rows = []
    for bench, path in recipes.items():
        rows += run(path, overrides, only, a.seeds, benchmark=bench)
    print(table(rows))



def identification_tables(recipes: dict, overrides: list[str], a) -> None:
    """--identifiers: every identifier refitted on one trained run per (benchmark, seed)."""
    from delo_dist import identification
    try:
        identifiers = identification.parse_identifiers(a.identifiers, a.identifier)
    except ValueError as e:
        raise SystemExit(f"--identifiers: {e}")
    if None in recipes:   # one recipe: name it after its file
        recipes = {Path(recipes[None]).stem: recipes[None]}
    base = load_recipe(next(iter(recipes.values())), overrides)
    out = Path(base.output_dir) / "identification"
    seeds = list(range(base.seed, base.seed + a.seeds))
    rows = identification.run(seeds, [o for o in overrides if not o.startswith("seed=")], out,
                              recipes, identifiers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(identification.table(rows))
    print(identification.table(rows))


if __name__ == "__main__":
    main()
