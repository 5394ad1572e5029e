"""Run DeLo's ablations and the lower bounds on one recipe, same data and seed; print a table.

    python -m delo_dist.ablations recipes/quickstart.yaml [key=value ...] [--only delo,seq_lora]
        [--seeds N]

Each variant trains in its own output folder under <output_dir>/ablations/<variant> (with
--seeds N > 1: .../<variant>/seed<S> for seeds S = seed .. seed+N-1) and logs its own MLflow
run per seed (tag `ablation`). The table (Markdown) reports task-agnostic AP and FG, oracle AP
and FG, and task-routing accuracy as mean ± sample std over the seeds (n), and is written to
<output_dir>/ablations/table.md; results.json keeps every seed's values.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# The paper's Table 4 and 6 as recipe overrides, plus the lower bounds users ask for.
VARIANTS: dict[str, dict] = {
    "delo": {},
    "delo_lora": {"method.name": "lora"},
    "no_cross_modal_guide": {"method.cross_modal_guide": False},
    "unified_pool": {"method.modality_pools": False},
    "only_ce": {"method.lambda_align": 0.0, "method.lambda_con": 0.0},
    "no_align": {"method.lambda_align": 0.0},
    "no_con": {"method.lambda_con": 0.0},
    "factor_rank_r": {"method.factor_rank": "${rank}"},
    "pooled_keys": {"task_id.source": "frozen_pooled"},
    "keys_paper": {"task_id.source": "paper"},
    "keys_first_layer": {"task_id.source": "first_layer"},
    "keys_prototypes": {"task_id.source": "class_prototypes"},
    "keys_analytic": {"task_id.source": "analytic"},
    "seq_lora": {"method.name": "seq_lora"},
    "head_only": {"method.name": "head_only"},
}


def overrides_for(variant: str, rank: int) -> list[str]:
    return [f"{k}={rank if v == '${rank}' else v}" for k, v in VARIANTS[variant].items()]


METRICS = ("ap", "fg", "oracle_ap", "oracle_fg", "routing_accuracy", "wall_time_s")


def run(recipe_path: str, overrides: list[str], only: list[str] | None = None,
        seeds: int = 1) -> list[dict]:
    """Train every variant for `seeds` seeds; rows hold each metric's mean (`ap`), sample std
    (`ap_std`, None for one seed), n, and the per-seed values (`per_seed`)."""
    from delo_dist.config import load_recipe
    from delo_dist.training.trainer import Trainer
    base = load_recipe(recipe_path, overrides)
    root = Path(base.output_dir) / "ablations"
    uri = base.tracking.uri or "sqlite:///" + str(root.resolve() / "mlflow.db")
    rows = []
    for name in only or list(VARIANTS):
        per_seed = []
        for seed in range(base.seed, base.seed + seeds):
            out = root / name if seeds == 1 else root / name / f"seed{seed}"
            extra = overrides_for(name, getattr(base.method.settings, "rank", 4)) + [
                f"seed={seed}", f"output_dir={out}", f"tracking.tags={{ablation: {name}}}",
                f"tracking.uri={uri}"]
            recipe = load_recipe(recipe_path, overrides + extra)
            if Trainer(recipe).run() != 0:
                raise SystemExit(f"variant {name} (seed {seed}) stopped before the end")
            m = json.loads((out / "metrics.json").read_text())
            per_seed.append({"seed": seed, **{k: m[k] for k in METRICS}})
        row = {"variant": name, "n": len(per_seed), "per_seed": per_seed}
        for k in METRICS:
            vals = [p[k] for p in per_seed]
            row[k] = statistics.fmean(vals)
            row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table(rows))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def cell(row: dict, key: str, scale: float = 100, digits: int = 2) -> str:
    """mean ± std (n=N) of one metric, in percent by default."""
    std = row.get(f"{key}_std")
    text = f"{scale * row[key]:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")
    return text + f" (n={row.get('n', 1)})"


def table(rows: list[dict]) -> str:
    lines = ["| variant | AP | FG | oracle AP | oracle FG | routing acc. | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {cell(r, 'ap')} | {cell(r, 'fg')} | {cell(r, 'oracle_ap')} | "
              f"{cell(r, 'oracle_fg')} | {cell(r, 'routing_accuracy', digits=1)} | "
              f"{r['wall_time_s']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=1,
                   help="train each variant with seeds seed .. seed+N-1 (the recipe's seed first)")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds wants an int >= 1")
    only = a.only.split(",") if a.only else None
    unknown = set(only or []) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    print(table(run(a.recipe, a.overrides, only, a.seeds)))


if __name__ == "__main__":
    main()
