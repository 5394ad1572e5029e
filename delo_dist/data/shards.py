"""The on-disk layout every dataset is turned into: WebDataset tars plus manifest.json.

    <root>/manifest.json
    <root>/session_00/train-00000.tar  (members per sample: <key>.jpg, <key>.txt, <key>.json)

manifest.json (format "delo-dist/1"):
    dataset, multilabel, num_classes, class_names, image_size,
    sessions: [{"classes": [global ids], "splits": {split: {"count", "shards", "keys", "files"}}}]
    files: {shard: {"bytes", "sha256", "count"}}: what each tar held when written. The trainer
    checks sizes on every run (cheap), `python -m delo_dist.data.verify ROOT` the hashes.
    Manifests written before "files" existed still load; their sizes cannot be checked.
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

from delo_dist.data.files import atomic_write_text, file_mismatch, file_sha256

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
    shards, keys, files = [], [], {}
    writer, tmp, final = None, None, None

    def close():
        if writer is not None:
            writer.close()
            os.replace(tmp, final)
            files[shards[-1]] = {"bytes": final.stat().st_size, "sha256": file_sha256(final),
                                 "count": len(keys) - sum(f["count"] for f in files.values())}

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
    return {"count": len(keys), "shards": shards, "keys": keys, "files": files}


def manifest_sha256(root: str | Path) -> str:
    """The data's identity: the hash of manifest.json (which holds every tar's hash)."""
    return file_sha256(Path(root) / "manifest.json")


def has_file_records(manifest: dict) -> bool:
    return all("files" in sess["splits"][split] for sess in manifest["sessions"]
               for split in sess["splits"])


def check_sizes(root: str | Path, manifest: dict) -> None:
    """Every tar has the size the manifest recorded (a cut or grown tar is caught here, before
    training); manifests without records are let through (the caller says so)."""
    wrong = []
    for sess in manifest["sessions"]:
        for entry in sess["splits"].values():
            for shard, rec in entry.get("files", {}).items():
                problem = file_mismatch(Path(root) / shard, rec["bytes"])   # "<actual> bytes"
                if problem is not None:
                    wrong.append(f"{shard}: {problem}, the manifest says {rec['bytes']}")
    if wrong:
        raise DataIntegrityError(f"{Path(root) / 'manifest.json'}: shards changed since they were "
                                 "written: " + "; ".join(wrong) +
                                 " (re-prepare them; `python -m delo_dist.data.verify` checks hashes)")


class DataIntegrityError(RuntimeError):
    """Shards disagree with their manifest, or hold samples that cannot be decoded."""


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(Path(root) / "manifest.json", json.dumps({"format": FORMAT, **manifest}, indent=1))


class ManifestError(DataIntegrityError, ValueError):
    """manifest.json is missing, malformed, or disagrees with itself or the folder."""


def read_manifest(root: str | Path) -> dict:
    """The manifest, checked for what can be checked without reading a tar: format, every
    split of every session present, counts that agree (split count = its keys = the sum of
    its files' counts), files recorded for exactly the listed shards, and those shards on
    disk. So a manifest that contradicts itself stops a job before any training."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; prepare the shards first")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); re-prepare the shards") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path}: format {found!r}, expected {FORMAT!r}")
    problems = _inconsistencies(Path(root), manifest)
    if problems:
        raise ManifestError(f"{path} contradicts itself or the folder: " + "; ".join(problems[:5])
                            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                            + ": re-prepare the shards")
    return manifest


def _inconsistencies(root: Path, manifest: dict) -> list[str]:
    sessions, n_classes = manifest.get("sessions"), manifest.get("num_classes")
    if not isinstance(sessions, list) or not sessions:
        return ["no sessions listed"]
    out = []
    for k, sess in enumerate(sessions):
        classes = sess.get("classes") or []
        if not classes:
            out.append(f"session {k} lists no classes")
        elif isinstance(n_classes, int) and not all(0 <= c < n_classes for c in classes):
            out.append(f"session {k} lists classes outside [0, num_classes={n_classes}): {classes}")
        for split in SPLITS:
            entry = sess.get("splits", {}).get(split)
            if entry is None:
                out.append(f"session {k} has no '{split}' split")
                continue
            where, count, keys = f"session {k} {split}", entry.get("count"), entry.get("keys", [])
            if count != len(keys):
                out.append(f"{where}: count {count}, but {len(keys)} sample keys listed")
            if len(set(keys)) != len(keys):
                out.append(f"{where}: {len(keys) - len(set(keys))} sample key(s) listed twice")
            files = entry.get("files")
            if files is not None:
                if set(files) != set(entry["shards"]):
                    out.append(f"{where}: files recorded for {sorted(files)}, shards listed "
                               f"{entry['shards']}")
                held = sum(f.get("count", 0) for f in files.values())
                if held != count:
                    out.append(f"{where}: count {count}, but its files hold {held} samples ("
                               + ", ".join(f"{s}: {f.get('count')}" for s, f in files.items()) + ")")
            for shard in entry["shards"]:
                if not (root / shard).is_file():
                    out.append(f"shard {shard} listed but missing")
    return out


def encode_jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def iter_tar_samples(urls: list[str], counter: dict | None = None) -> Iterator[dict]:
    """Raw samples from tars in the given order; unreadable members are skipped and counted."""
    def handler(exn):
        if counter is not None:
            counter["skipped"] = counter.get("skipped", 0) + 1
            counter.setdefault("read_errors", []).append(repr(exn)[:300])
        return True  # keep going: the stream counts samples against the manifest at the end

    yield from wds.tarfile_to_samples(handler=handler)(iter({"url": u} for u in urls))
