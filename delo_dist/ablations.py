"""Run DeLo's ablations and the lower bounds on one recipe, same data and seed; print a table.

    python -m delo_dist.ablations recipes/quickstart.yaml [key=value ...] [--only delo,seq_lora]

Each variant trains in its own output folder under <output_dir>/ablations/<variant> and logs
its own MLflow run (tag `ablation`). The table (Markdown) reports task-agnostic AP and FG,
oracle AP and task-routing accuracy, and is written to <output_dir>/ablations/table.md.
"""
from __future__ import annotations

import argparse
import json
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
    "pooled_keys": {"task_keys.source": "frozen_pooled"},
    "keys_paper": {"task_keys.source": "paper"},
    "keys_first_layer": {"task_keys.source": "first_layer"},
    "keys_prototypes": {"task_keys.source": "class_prototypes"},
    "keys_analytic": {"task_keys.source": "analytic"},
    "seq_lora": {"method.name": "seq_lora"},
    "head_only": {"method.name": "head_only"},
}


def overrides_for(variant: str, rank: int) -> list[str]:
    return [f"{k}={rank if v == '${rank}' else v}" for k, v in VARIANTS[variant].items()]


def run(recipe_path: str, overrides: list[str], only: list[str] | None = None) -> list[dict]:
    from delo_dist.config import load_recipe
    from delo_dist.training.trainer import Trainer
    base = load_recipe(recipe_path, overrides)
    root = Path(base.output_dir) / "ablations"
    rows = []
    for name in only or list(VARIANTS):
        out = root / name
        extra = overrides_for(name, base.method.rank) + [
            f"output_dir={out}", f"tracking.tags={{ablation: {name}}}",
            f"tracking.uri={base.tracking.uri or 'sqlite:///' + str(root.resolve() / 'mlflow.db')}"]
        recipe = load_recipe(recipe_path, overrides + extra)
        if Trainer(recipe).run() != 0:
            raise SystemExit(f"variant {name} stopped before the end")
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"variant": name, "ap": m["ap"], "fg": m["fg"], "oracle_ap": m["oracle_ap"],
                     "oracle_fg": m["oracle_fg"], "routing_accuracy": m["routing_accuracy"],
                     "wall_time_s": m["wall_time_s"]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table(rows))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | AP | FG | oracle AP | oracle FG | routing acc. | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {100 * r['ap']:.2f} | {100 * r['fg']:.2f} | "
              f"{100 * r['oracle_ap']:.2f} | {100 * r['oracle_fg']:.2f} | "
              f"{100 * r['routing_accuracy']:.1f} | {r['wall_time_s']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(VARIANTS)}")
    a = p.parse_args(argv)
    only = a.only.split(",") if a.only else None
    unknown = set(only or []) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    print(table(run(a.recipe, a.overrides, only)))


if __name__ == "__main__":
    main()
