"""The on-disk layout every dataset is turned into: WebDataset tars plus manifest.json.

    <root>/manifest.json
    <root>/session_00/train-00000.tar  (members per sample: <key>.jpg, <key>.txt, <key>.json)

manifest.json (format "delo-dist/1"):
    dataset, multilabel, num_classes, class_names, image_size,
    sessions: [{"classes": [global ids], "splits": {split: {"count", "shards", "keys"}}}]
The json member holds {"label": int | [int, ...], "session": k}; labels are global ids.
Shards are written to a temporary name and renamed, so a killed writer never leaves a
half tar that looks whole; the manifest is written last, the same way.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds

FORMAT = "delo-dist/1"
SPLITS = ("train", "val", "test")


def sample_key(session: int, split: str, index: int) -> str:
    # WebDataset splits member names at the first dot: keys must not contain one.
    return f"s{session:02d}-{split}-{index:07d}"


def write_split(samples: Iterable[dict], root: Path, session: int, split: str,
                samples_per_shard: int) -> dict:
    """Write dicts {key, jpg (bytes), txt (str), label} into tars; return the split entry."""
    folder = Path(root) / f"session_{session:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    shards, keys = [], []
    writer, tmp, final = None, None, None

    def close():
        if writer is not None:
            writer.close()
            os.replace(tmp, final)

    for s in samples:
        if len(keys) % samples_per_shard == 0:
            close()
            name = f"{split}-{len(shards):05d}.tar"
            final = folder / name
            tmp = folder / (name + ".tmp")
            writer = wds.TarWriter(str(tmp))
            shards.append(f"session_{session:02d}/{name}")
        writer.write({
            "__key__": s["key"],
            "jpg": s["jpg"],
            "txt": s["txt"].encode("utf-8"),
            "json": json.dumps({"label": s["label"], "session": session}).encode(),
        })
        keys.append(s["key"])
    close()
    return {"count": len(keys), "shards": shards, "keys": keys}


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest}
    tmp = Path(root) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(root) / "manifest.json")


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; prepare the shards first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for k, sess in enumerate(manifest["sessions"]):
        for split in SPLITS:
            if split not in sess["splits"]:
                raise ValueError(f"{path}: session {k} has no '{split}' split")
            for shard in sess["splits"][split]["shards"]:
                if not (Path(root) / shard).is_file():
                    raise FileNotFoundError(f"{path}: shard {shard} listed but missing")
    return manifest


def encode_jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def iter_tar_samples(urls: list[str], counter: dict | None = None) -> Iterator[dict]:
    """Raw samples from tars in the given order; unreadable members are skipped and counted."""
    def handler(exn):
        if counter is not None:
            counter["skipped"] = counter.get("skipped", 0) + 1
        return True  # keep going

    yield from wds.tarfile_to_samples(handler=handler)(iter({"url": u} for u in urls))
