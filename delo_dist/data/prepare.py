"""Turn a raw dataset into shards + manifest.json (the layout of delo_dist.data.shards).

    python -m delo_dist.data.prepare food101 --root raw/food101 --out data/food101
    python -m delo_dist.data.prepare mmimdb --root raw/mmimdb --out data/mmimdb
    python -m delo_dist.data.prepare cmml-json --root raw/food101 --name food101 --out data/f101
    python -m delo_dist.data.prepare hf --dataset raw/my_arrow --splits train=train,test=test \
        --image-column image --text-column text --label-column label --sessions 4 --out data/mine

Layouts and the rules that pick classes, sessions and texts are in delo_dist.data.sources;
the rules are written into the manifest. Images are decoded, resized to a square of
--image-size (what the ViLT collate feeds the model, so reading needs no resize) and
re-encoded as JPEG. Sample keys are s<session>-<split>-<index>, the index being the item's
rank among its (session, split) sorted by source id, given before any item is dropped: a
key always names the same source item, whatever else was dropped. Items are written in a
seeded shuffled order so that a shard mixes classes (the stream's shuffle buffer is small).

Bad items (unreadable or missing image, empty or missing text) are skipped, counted and
reported; layout errors stop with a message naming the file and the item. Shards are written
tmp+rename and the manifest last; a re-run with the same inputs and options says "up to
date", anything else rebuilds from scratch (old manifest and session folders removed first).
Inputs are fingerprinted: metadata files by sha256 of their content, images by path, size
and mtime (hashing every image would cost as much as a rebuild).
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import shutil
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from delo_dist.data.shards import (SPLITS, encode_jpeg, file_sha256, read_manifest, sample_key,
                                   write_manifest, write_split)
from delo_dist.data.hf_source import hf_dataset
from delo_dist.data.sources import READERS as FOLDER_READERS
from delo_dist.data.sources import Plan, SourceError

READERS = {**FOLDER_READERS, "hf": hf_dataset}  # hf: --dataset is a folder, files or a hub id


def load_image(path: Path, size: int, quality: int) -> tuple[bytes | None, str | None]:
    """(jpeg bytes, None) or (None, why): bad images are data, not exceptions."""
    try:
        opened = Image.open(path) if isinstance(path, (str, Path)) else path.open()  # HFImage
        with opened as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            img = img.convert("RGB")        # full decode: a truncated file raises here
        return encode_jpeg(img.resize((size, size), Image.BICUBIC), quality), None
    except FileNotFoundError:
        return None, "image file missing"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, "unreadable image"


# ------------------------------------------------------------------------- fingerprints

def input_checksums(plan: Plan, root: Path) -> dict:
    files = {}
    for p in plan.metadata:
        rel = os.path.relpath(p, root)
        if p.is_dir():  # e.g. mmimdb labels/: one digest over its files' names and contents
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(f"{f.relative_to(p)}\t{file_sha256(f)}\n".encode())
            files[rel + "/"] = h.hexdigest()
        else:
            files[rel] = file_sha256(p)
    h = hashlib.sha256()
    for it in sorted(plan.items, key=lambda it: (it.split, it.id)):
        if not isinstance(it.image, Path):  # inside a dataset: its fingerprint covers the image
            h.update(f"{it.id}\t{it.image}\n".encode())
            continue
        try:
            st = it.image.stat()
            h.update(f"{os.path.relpath(it.image, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.relpath(it.image, root)}\tmissing\n".encode())
    out = {"files": files, "images": {"count": len(plan.items), "path_size_mtime_sha256": h.hexdigest()}}
    if plan.fingerprint:
        out["dataset_fingerprints"] = plan.fingerprint
    return out


def _up_to_date(out: Path, source: dict) -> bool:
    try:
        manifest = read_manifest(out)  # also checks that every listed shard exists
    except (FileNotFoundError, ValueError):
        return False
    old = manifest.get("source", {})
    return old.get("options") == source["options"] and old.get("inputs") == source["inputs"]


def clean(out: Path) -> None:
    """Remove what a previous preparation wrote: the manifest first, so nothing half-removed
    ever looks whole."""
    for name in ("manifest.json", "manifest.json.tmp"):
        (out / name).unlink(missing_ok=True)
    for d in sorted(out.glob("session_*")):
        if d.is_dir():
            shutil.rmtree(d)


# ------------------------------------------------------------------------- preparation

def prepare(source: str, root: str | Path, out: str | Path, *, image_size: int = 384,
            quality: int = 90, samples_per_shard: int = 1000, seed: int = 0, workers: int = 0,
            force: bool = False, progress: bool = True, **reader_args) -> dict:
    """Prepare `source` from `root` into `out`; return a summary (also printed by main)."""
    if source not in READERS:
        raise SourceError(f"unknown source {source!r}; expected one of {sorted(READERS)}")
    root, out = Path(root), Path(out)
    if source != "hf" and not root.is_dir():  # hf: a hub id is not a folder
        raise SourceError(f"{root}: raw data folder not found")
    reader_args = {k: v for k, v in reader_args.items() if v is not None}
    plan = READERS[source](root, **reader_args)
    options = {"source": source, "image_size": image_size, "quality": quality,
               "samples_per_shard": samples_per_shard, "seed": seed,
               **{k: str(v) for k, v in reader_args.items()}}
    src = {"kind": source, "root": str(root.resolve() if root.exists() else root), "options": options,
           "inputs": input_checksums(plan, root), "rules": plan.rules}
    if not force and _up_to_date(out, src):
        return {"status": "up to date", "out": str(out), **read_manifest(out)["preparation"]}

    out.mkdir(parents=True, exist_ok=True)
    clean(out)
    groups = defaultdict(list)
    for it in plan.items:
        groups[(it.session, it.split)].append(it)
    load = partial(load_image, size=image_size, quality=quality)
    # spawn, not fork: forking a process that already runs torch or tokenizer threads can
    # leave the children deadlocked (seen here when prepare ran after the trainer in one process)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    bar = tqdm(total=len(plan.items), desc=f"prepare {plan.dataset}", unit="sample",
               disable=not progress)
    sessions = []
    try:
        for k, classes in enumerate(plan.sessions):
            splits = {}
            for split in SPLITS:
                splits[split] = _write_group(groups[(k, split)], plan, out, k, split, load, pool,
                                             bar, samples_per_shard, seed)
                if split != "val" and splits[split]["count"] == 0:
                    raise SourceError(f"{root}: session {k} has no '{split}' sample left after "
                                      f"dropping bad items ({dict(plan.dropped)})")
            sessions.append({"classes": classes,
                             "class_names": [plan.class_names[c] for c in classes],
                             "splits": splits})
    finally:
        bar.close()
        if pool is not None:  # every result was consumed, or we are failing: stop now
            pool.terminate()
            pool.join()
    preparation = {
        "counts": [{s: sess["splits"][s]["count"] for s in SPLITS} for sess in sessions],
        "dropped": dict(sorted(plan.dropped.items())),
        "dropped_examples": {r: v for r, v in sorted(plan.examples.items())},
    }
    write_manifest(out, {
        "dataset": plan.dataset, "multilabel": plan.multilabel,
        "num_classes": len(plan.class_names), "class_names": plan.class_names,
        "image_size": image_size, "sessions": sessions, "source": src,
        "preparation": preparation,
    })
    return {"status": "built", "out": str(out), **preparation}


def _write_group(items, plan, out, k, split, load, pool, bar, samples_per_shard, seed) -> dict:
    indexed = list(enumerate(sorted(items, key=lambda it: it.id)))  # index -> stable key
    random.Random(f"{seed}-{k}-{split}").shuffle(indexed)             # mixed classes per shard
    todo = []
    for idx, it in indexed:
        if it.text:
            todo.append((idx, it))
        else:
            plan.drop("empty or missing text", it.id)
            bar.update(1)
    images = [it.image for _, it in todo]
    results = pool.imap(load, images, chunksize=8) if pool is not None else map(load, images)
    sources = []

    def samples():
        for (idx, it), (jpg, why) in zip(todo, results):
            bar.update(1)
            if jpg is None:
                plan.drop(why, it.id)
                continue
            sources.append(it.id)
            yield {"key": sample_key(k, split, idx), "jpg": jpg, "txt": it.text, "label": it.label}

    entry = write_split(samples(), out, k, split, samples_per_shard)
    entry["sources"] = sources  # source id of each key, in the same order
    return entry


# ------------------------------------------------------------------------- command line

def report(summary: dict, file=None) -> None:
    file = file or sys.stdout
    if summary["status"] == "up to date":
        print(f"{summary['out']}: up to date (inputs and options unchanged)", file=file)
    print(f"{'session':>7} {'train':>8} {'val':>8} {'test':>8}", file=file)
    for k, c in enumerate(summary["counts"]):
        print(f"{k:>7} {c['train']:>8} {c['val']:>8} {c['test']:>8}", file=file)
    total = {s: sum(c[s] for c in summary["counts"]) for s in SPLITS}
    print(f"{'total':>7} {total['train']:>8} {total['val']:>8} {total['test']:>8}", file=file)
    for reason, n in summary["dropped"].items():
        examples = ", ".join(summary["dropped_examples"].get(reason, []))
        print(f"dropped {n} ({reason}), e.g. {examples}", file=file)
    if not summary["dropped"]:
        print("dropped 0", file=file)
    if summary["status"] == "built":
        print(f"wrote {summary['out']}/manifest.json", file=file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", choices=sorted(READERS))
    p.add_argument("--root", help="raw data folder (food101, mmimdb, cmml-json)")
    p.add_argument("--out", required=True, help="shard folder (manifest.json + session_*/)")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="order of samples inside the shards")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding processes (0: in this process)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sessions", help="food101 (10), mmimdb (5); hf: N equal sessions of the "
                   "class order, or class lists 'a,b|c,d' (names or ids)")
    p.add_argument("--classes-per-session", type=int,
                   help="food101 (10), mmimdb (4); cmml-json: inferred unless given")
    p.add_argument("--name", help="cmml-json: read <root>/<NAME>.json")
    p.add_argument("--class-names", type=Path, help="cmml-json: JSON list of class names")
    hf = p.add_argument_group("hf (Hugging Face datasets; see delo_dist.data.hf_source)")
    hf.add_argument("--dataset", help="save_to_disk folder, local script or data files, or hub id")
    hf.add_argument("--config", help="the dataset's configuration name")
    hf.add_argument("--image-column", default="image")
    hf.add_argument("--text-column", default="text")
    hf.add_argument("--label-column", default="label")
    hf.add_argument("--splits", help="OURS=THEIRS pairs, e.g. train=train,val=validation,test=test")
    hf.add_argument("--split-column", help="a column holding train / val (validation, dev) / test")
    a = p.parse_args(argv)
    if (a.source == "hf") != (a.root is None) or (a.source == "hf") != (a.dataset is not None):
        p.error("hf takes --dataset (not --root); the other sources take --root")
    extra = {"classes_per_session": a.classes_per_session}
    if a.source == "cmml-json":
        extra.update(name=a.name, class_names=a.class_names)
    elif a.source == "hf":
        extra.update(config=a.config, image_column=a.image_column, text_column=a.text_column,
                     label_column=a.label_column, splits=a.splits, split_column=a.split_column,
                     sessions=a.sessions or "1")
    else:
        if a.sessions is not None and not a.sessions.isdigit():
            p.error(f"--sessions for {a.source} is a number of sessions, got {a.sessions!r}")
        extra.update(sessions=int(a.sessions) if a.sessions else None)
    try:
        summary = prepare(a.source, a.dataset or a.root, a.out, image_size=a.image_size, quality=a.quality,
                          samples_per_shard=a.samples_per_shard, seed=a.seed, workers=a.workers,
                          force=a.force, progress=not a.quiet, **extra)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
