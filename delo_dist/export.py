"""Write an inference folder: what prediction needs and nothing else.

    python -m delo_dist.export CHECKPOINT OUT

CHECKPOINT: a training checkpoint (<output_dir>/checkpoints/<tag>) or a run folder (its newest
checkpoint). OUT (absent or empty) receives
    model.safetensors  the adapters and heads of every session, the task identifier's routing
                       state, and the backbone's weights only when it is a tiny random one
                       (a pretrained backbone is a reference, loaded from the hub or its folder)
    config.json        format, class names, each session's classes, sessions finished,
                       multi-label or not, precision, backbone identity (name, pretrained
                       reference or tiny config, image size, text length), tokenizer reference,
                       the tensors left out
    recipe.yaml        the recipe the model was trained with
Left out: the optimiser state, the RNG states, the run's results, and the identifier's
fitting statistics that routing never reads (`analytic`: the train and validation Gram
matrices and sums; routing reads only the solved weights), so an export cannot continue
training. `delo_dist.load` and `python -m delo_dist.predict` read either folder and predict
identically from both. Mergeable methods (MoRA) keep their factors: merging happens at
prediction time, per batch routed to one session, as in evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from delo_dist.inference import load
from delo_dist.model_folder import (EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_RECIPE, WEIGHTS,
                                    CheckpointError, ModelInfo, fit_only_tensors)


def tensor_groups(names_sizes: dict[str, int]) -> dict[str, int]:
    """Bytes by part of the model: backbone, adapters, heads, identifier."""
    out = {"backbone": 0, "adapters": 0, "heads": 0, "identifier": 0}
    for name, size in names_sizes.items():
        part = ("adapters" if ".sessions." in name or name.startswith("prompter.")   # method parts
                else "heads" if name.startswith("heads.")
                else "identifier" if name.startswith("identifier.") else "backbone")
        out[part] += size
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_export(folder: Path, tensors: dict, info: ModelInfo, recipe: str) -> None:
    """The inference folder's files in `folder` (which exists): the tensors, the recipe's
    YAML text and config.json (`info.config` of that recipe)."""
    import yaml
    from safetensors.torch import save_file
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": EXPORT_FORMAT})
    (folder / EXPORT_RECIPE).write_text(recipe)
    (folder / EXPORT_CONFIG).write_text(json.dumps(info.config(yaml.safe_load(recipe)), indent=1))


def export(checkpoint: str | Path, out: str | Path, *, shards=None, backbone=None) -> dict:
    """Write the inference folder `out` from `checkpoint`; return what was written (sizes)."""
    from delo_dist.training.checkpoint import model_tensors
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; export into a new folder")
    # Loading builds the model and checks every tensor: an export is never written from a
    # checkpoint this version cannot read.
    model = load(checkpoint, device="cpu", shards=shards, backbone=backbone)
    info, net = model.info, model.model
    if info.kind == "export":
        raise CheckpointError(f"{checkpoint}: already an export")
    tensors = model_tensors(net, include_backbone=not model.recipe.backbone.pretrained)
    dropped = sorted(fit_only_tensors(net) & set(tensors))
    tensors = {n: t for n, t in tensors.items() if n not in dropped}
    info.dropped = tuple(dropped)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_export(tmp, tensors, info, info.recipe_path.read_text())
    if out.exists():
        out.rmdir()   # empty (checked above)
    os.replace(tmp, out)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    return {"out": str(out), "checkpoint": str(info.source), "bytes": folder_bytes(out),
            "checkpoint_bytes": folder_bytes(info.source), "parts": tensor_groups(sizes),
            "dropped": dropped, "files": {f.name: f.stat().st_size for f in sorted(out.iterdir())}}


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m delo_dist.export",
                                 description="Write an inference folder from a checkpoint.")
    ap.add_argument("checkpoint", help="training checkpoint or run folder")
    ap.add_argument("out", help="the inference folder to write (absent or empty)")
    ap.add_argument("--manifest", help="shards folder whose manifest names the classes, if not "
                    "at the recipe's data.shards")
    ap.add_argument("--backbone", help="a local copy of the pretrained backbone")
    args = ap.parse_args(argv)
    try:
        res = export(args.checkpoint, args.out, shards=args.manifest, backbone=args.backbone)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['out']}: {_mb(res['bytes'])} (training checkpoint {res['checkpoint']}: "
          f"{_mb(res['checkpoint_bytes'])})")
    for name, size in res["files"].items():
        print(f"  {name:18s} {_mb(size):>10s}")
    print("  tensors: " + ", ".join(f"{part} {_mb(b)}" for part, b in res["parts"].items() if b))
    if res["dropped"]:
        print("  left out (fitting only): " + ", ".join(res["dropped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
