"""Benchmark: the training step and inference of every method, one backbone, one batch.

    python -m delo_dist.bench [--backbone vilt | --clip] [--methods a,b] [--reference NAME]
                              [--hidden 256 --layers 4 --batch 8 ... | --full]
                              [--set KEY=VALUE ...] [--device cuda --dtype bf16]
                              [--predict-batch 64] [--json out.json]

One harness (harness.py) times named rows round-robin and reports median and min per row,
ratios of both, JSON and a table; it names no method. The rows come from the plug-ins' bench
entries (`bench` of a method or backbone class, delo_dist.plugins.BenchEntry; rows.py):
  - the backbone: `frozen/<backbone>` (its forward alone) and its variants (ViLT: eager
    attention), and the loader rows (loader.py: our shard path against the backbone's
    reference pipeline);
  - every method registered (or those of --methods) whose needs the backbone meets:
    `train/<m>` (the trainer's step), `oracle/<m>`, `agnostic/<m>` (task-agnostic
    inference), and the models its entry adds (`<kind>/<m>_<variant>`: a naive path, other
    settings, other session counts, a reference implementation, ...);
  - the prediction rows (predict.py): `delo_dist.load(...)`'s predict path next to the
    evaluation path, samples/s at batch 64.
Ratios are declared by the entries, with their targets; `comparison` sets each method's
training step and task-agnostic inference against the reference method's (the recipe's
default), with each call's trainable parameters and its cost in frozen forwards.
"""
from __future__ import annotations


def main(argv=None) -> dict:
    from delo_dist.bench.cli import main as _main
    return _main(argv)
