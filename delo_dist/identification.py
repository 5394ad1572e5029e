"""Task identification compared on the same trained models: train once, refit every
identifier. The engine of `python -m delo_dist.ablations --identifiers GROUP` (README).

Identification reads only adapter-free features and never changes what trains (adapters and
heads see the true session), so each (benchmark, seed) trains DeLo ONCE (the recipe's own
identifier, under <out>/<benchmark>/seed<s>/run) and every identifier is then refitted on
that run's final checkpoint (`refit`): a fresh identifier of the variant's `task_id.*`
settings replays what training would have given it, session by session (EMA keys: the
training stream's global batches, in order, every epoch; fitted sources: their
end-of-session fit), and the model is evaluated after each session as the trainer does.
Later sessions never change an earlier session's adapters or head (DeLo), so the final
checkpoint stands for every earlier one: the accuracy, oracle and routing matrices are those
a training run with that identifier would report (the refit of the run's own identifier
reproduces the run's routing; a test checks it).

Reported per benchmark and identifier, mean +/- sample std over seeds (n): routing
accuracy (overall, complete, text-only, image-only), AP, oracle AP, FG, the identifier's
end-of-session fit time (all sessions; "-" for EMA keys, updated during training) and its
state (MB, 10^6 bytes, what a checkpoint carries). Each refit keeps
<out>/<benchmark>/seed<s>/<identifier>.json, and an existing one is reused (rerunning the
command after a stop redoes only what is missing).
"""
from __future__ import annotations

import json
from pathlib import Path

from delo_dist import plugins
from delo_dist.metrics import mean_std

# identifier name -> task_id overrides (on top of the trained run's recipe)
IDENTIFIERS: dict[str, list[str]] = {
    **{name: [f"task_id.source={name}"] for name in plugins.names("task_id")},   # defaults
    "analytic_no_layers": ["task_id.source=analytic", "task_id.analytic.layers=none"],
    "analytic_last": ["task_id.source=analytic", "task_id.analytic.layers=last"],
    "analytic_all_raw": ["task_id.source=analytic", "task_id.analytic.layers=all", "task_id.analytic.max_dims=null"],
    "analytic_class": ["task_id.source=analytic", "task_id.analytic.targets=class"],
    # all layers hashed to 57 % / 29 % of the quickstarts' 451 dims (the issue's probe widths)
    "analytic_sketch57": ["task_id.source=analytic", "task_id.analytic.max_dims=257", "task_id.analytic.reduce=sketch"],
    "analytic_sketch29": ["task_id.source=analytic", "task_id.analytic.max_dims=131", "task_id.analytic.reduce=sketch"],
}
GROUPS = {"sources": [*plugins.names("task_id"), "analytic_no_layers"],
          "analytic": ["analytic_no_layers", "analytic", "analytic_last", "analytic_all_raw",
                       "analytic_class", "analytic_sketch57", "analytic_sketch29"]}
COLUMNS = ["routing", "complete", "text_only", "image_only", "ap", "oracle_ap", "fg"]


def train_once(recipe: str, overrides: list[str], root: Path) -> Path:
    """Train the recipe into root (nothing is redone if it finished there): its run folder."""
    from delo_dist.config import load_recipe
    from delo_dist.training.trainer import Trainer
    uri = "sqlite:///" + str(root.parent.parent.resolve() / "mlflow.db")
    r = load_recipe(recipe, overrides + [f"output_dir={root}", f"tracking.uri={uri}"])
    if Trainer(r).run() != 0:
        raise SystemExit(f"{recipe} ({' '.join(overrides)}) stopped before the end")
    return root


def refit(run: Path, overrides: list[str], out: Path) -> dict:
    """Refit an identifier (`overrides`: task_id.* keys) on the finished run in `run` and
    evaluate it after every session; returns the metrics (fractions) with the matrices."""
    import time

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from delo_dist import metrics as M
    from delo_dist.config import load_recipe
    from delo_dist.models.inputs import concat_batches
    from delo_dist.training import checkpoint
    from delo_dist.training.objective import observe_task_id
    from delo_dist.training.trainer import Trainer, to_device

    ckpt = checkpoint.latest(run)
    if ckpt is None or not (run / "metrics.json").is_file():
        raise SystemExit(f"{run}: no finished run (metrics.json and a checkpoint) to refit on")
    recipe = load_recipe(run / "recipe.resolved.yaml",
                         overrides + [f"output_dir={out}", f"eval.checkpoint={ckpt}"])
    tr = Trainer(recipe)
    tr.setup()   # evaluation mode: no run record, no tracking; the model with this identifier
    try:
        model = tr.model
        tensors = load_file(str(ckpt / "model.safetensors"))   # all but the identifier's state
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, t in tensors.items():
                if not name.startswith(("identifier.", "task_keys.")):
                    own[name].copy_(t)
        ident, epochs = model.identifier, recipe.train.epochs
        acc, oracle, routing, fit_s = [], [], [], 0.0
        for k in range(tr.n_sessions):
            if not ident.fits_per_session:   # EMA keys: every optimizer step's global batch
                with torch.no_grad():
                    for epoch in range(epochs):
                        micro = []
                        for batch in tr.stream(k, "train", True, epoch)[1]:
                            micro.append(to_device(batch, tr.device))
                            if len(micro) == tr.accum:
                                observe_task_id(model, concat_batches(micro), k)
                                micro = []
            t0 = time.time()
            info = tr.fit_task_identifier(k)
            fit_s += time.time() - t0
            row, oracle_row, routing_row, by_availability, _ = tr.evaluate(k + 1)
            acc.append(row)
            oracle.append(oracle_row)
            routing.append(routing_row)
        return {"overrides": overrides, "checkpoint": str(ckpt),
                "accuracy_matrix": acc, "oracle_matrix": oracle, "routing_matrix": routing,
                "ap": M.average_performance(acc), "fg": M.forgetting(acc),
                "oracle_ap": M.average_performance(oracle),
                "routing": float(np.mean(routing[-1])),
                **{n: by_availability["overall"][n] for n in ("complete", "text_only", "image_only")},
                "fit_s": fit_s if ident.fits_per_session else None,   # EMA: no fit
                "state_mb": ident.state_bytes() / 1e6,
                "describe": ident.describe(), "last_fit": info}
    finally:
        tr.lock.release()


def run(seeds: list[int], overrides: list[str], out: Path, benchmarks: dict[str, str],
        identifiers: dict[str, list[str]]) -> list[dict]:
    """benchmarks: name -> recipe; every identifier refitted on each (benchmark, seed)."""
    rows = []
    for bench, recipe in benchmarks.items():
        for seed in seeds:
            root = out / bench / f"seed{seed}"
            trained = train_once(recipe, overrides + [f"seed={seed}"], root / "run")
            for name, extra in identifiers.items():
                cached = root / f"{name}.json"
                res = json.loads(cached.read_text()) if cached.is_file() else None
                if res is None or res["overrides"] != extra:
                    res = refit(trained, extra, root / "refit" / name)
                    cached.write_text(json.dumps(res, indent=1))
                print(f"{bench} seed {seed} {name}: routing {100 * res['routing']:.1f}% "
                      f"AP {100 * res['ap']:.2f} (oracle {100 * res['oracle_ap']:.2f})", flush=True)
                rows.append({"benchmark": bench, "identifier": name, "seed": seed,
                             **{c: res[c] for c in COLUMNS + ["fit_s", "state_mb"]}})
    return rows


def _cell(vals: list, scale: float = 100, digits: int = 1) -> str:
    mean, std, n = mean_std(vals)
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f}" + (f" +/- {scale * std:.{digits}f}" if std is not None else "")


def table(rows: list[dict]) -> str:
    """Markdown: mean +/- sample std over the seeds (n) of each benchmark x identifier."""
    lines = ["| benchmark | identifier | n | routing | complete | text-only | image-only | AP | "
             "oracle AP | FG | fit (s) | state (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        for name in dict.fromkeys(r["identifier"] for r in rows):
            group = [r for r in rows if r["benchmark"] == bench and r["identifier"] == name]
            if group:
                lines.append(f"| {bench} | {name} | {len(group)} | "
                             + " | ".join(_cell([r[c] for r in group]) for c in COLUMNS)
                             + f" | {_cell([r['fit_s'] for r in group], 1, 1)}"
                             + f" | {_cell([r['state_mb'] for r in group], 1, 2)} |")
    return "\n".join(lines) + "\n"


def parse_identifiers(spec: str, custom: list[str]) -> dict[str, list[str]]:
    """--identifiers a,b or a group (sources, analytic); --identifier NAME:key=v,key=v adds one."""
    names = [n for part in spec.split(",") if part for n in GROUPS.get(part, [part])]
    unknown = [n for n in names if n not in IDENTIFIERS]
    if unknown:
        raise ValueError(f"--identifiers: unknown {unknown}; known: {list(IDENTIFIERS)} "
                         f"or groups {list(GROUPS)}")
    chosen = {n: IDENTIFIERS[n] for n in names}
    for item in custom:
        name, _, keys = item.partition(":")
        if not name or not keys:
            raise ValueError(f"--identifier {item!r}: expected NAME:task_id.key=value[,key=value]")
        chosen[name] = keys.split(",")
    return chosen
