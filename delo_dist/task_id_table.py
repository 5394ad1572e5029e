"""Every task-identification source on both synthetic benchmarks, over seeds: one table.

    python -m delo_dist.task_id_table --seeds 0,1,2 [key=value ...]

For each benchmark recipe (cue: recipes/quickstart.yaml, content:
recipes/quickstart_content.yaml) and seed, runs the ablations' task-key variants
(`delo_dist.ablations`, same data and seed for every source) under
<out>/<benchmark>/seed<s>/, then reports mean +/- std over seeds of AP, oracle AP, routing
accuracy and routing accuracy by availability (complete, text-only, image-only), as
Markdown in <out>/table.md and JSON in <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BENCHMARKS = {"cue": "recipes/quickstart.yaml", "content": "recipes/quickstart_content.yaml"}
VARIANTS = {"paper": "keys_paper", "first_layer": "keys_first_layer",
            "frozen_pooled": "pooled_keys", "class_prototypes": "keys_prototypes",
            "analytic": "keys_analytic"}
COLUMNS = ["ap", "oracle_ap", "routing", "complete", "text_only", "image_only"]


def run(seeds: list[int], overrides: list[str], out: Path, benchmarks: list[str]) -> list[dict]:
    from delo_dist import ablations
    rows = []
    for bench in benchmarks:
        for seed in seeds:
            root = out / bench / f"seed{seed}"
            ablations.run(BENCHMARKS[bench], overrides + [f"seed={seed}", f"output_dir={root}"],
                          only=list(VARIANTS.values()))
            for source, variant in VARIANTS.items():
                m = json.loads((root / "ablations" / variant / "metrics.json").read_text())
                avail = m["routing_by_availability"]["overall"]
                rows.append({"benchmark": bench, "source": source, "seed": seed, "ap": m["ap"],
                             "oracle_ap": m["oracle_ap"], "routing": m["routing_accuracy"],
                             **{k: avail[k] for k in ("complete", "text_only", "image_only")}})
    return rows


def table(rows: list[dict]) -> str:
    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        return f"{100 * np.mean(vals):.1f} +/- {100 * np.std(vals):.1f}"
    lines = ["| benchmark | source | seeds | AP | oracle AP | routing | complete | text-only | image-only |",
             "|---|---|---|---|---|---|---|---|---|"]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        for source in VARIANTS:
            group = [r for r in rows if r["benchmark"] == bench and r["source"] == source]
            if group:
                lines.append(f"| {bench} | {source} | {len(group)} | " +
                             " | ".join(cell([r[c] for r in group]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. train.epochs=8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--benchmarks", default="cue,content")
    p.add_argument("--out", default="outputs/task_id")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = run([int(s) for s in a.seeds.split(",")], a.overrides, out, a.benchmarks.split(","))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
