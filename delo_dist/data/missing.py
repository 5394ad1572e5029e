"""Missing-modality tables, applied at load time so one set of shards serves every eta.

Status per sample: 0 complete, 1 text missing (image only), 2 image missing (text only).
A table is a pure function of (keys, eta, type, both_ratio, seed, session, split):
  - exactly n_missing = int(N * eta) samples of the split are incomplete (a 1e-9 guard
    keeps float products such as 0.29 * 100 from rounding down to 28);
  - type "text" drops their text, "image" their image, and "both" drops the image of
    int(n_missing * both_ratio) of them and the text of the rest (the MAP/RebQ convention;
    both_ratio 0.5 gives the paper's "65 % image, 65 % text" row at eta 0.7).
Keys are sorted first, so the table does not depend on shard order or reading order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2
_TYPES = {"none": 0, "text": 1, "image": 2, "both": 3}
_SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class MissingSpec:
    eta: float
    missing_type: str
    both_ratio: float = 0.5
    seed: int = 0


def _count(n: int, frac: float) -> int:
    return int(n * frac + 1e-9)


def missing_table(keys: list[str], spec: MissingSpec, session: int, split: str) -> dict[str, int]:
    """Map each sample key of one (session, split) to its missing status."""
    if spec.missing_type not in _TYPES:
        raise ValueError(f"missing_type must be one of {sorted(_TYPES)}, got {spec.missing_type!r}")
    if not 0.0 <= spec.eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {spec.eta}")
    ordered = sorted(keys)
    status = np.zeros(len(ordered), dtype=np.int8)
    if spec.missing_type != "none" and spec.eta > 0:
        seq = np.random.SeedSequence([spec.seed, session, _SPLITS.get(split, 9),
                                      round(spec.eta * 1e6), _TYPES[spec.missing_type],
                                      round(spec.both_ratio * 1e6)])
        perm = np.random.default_rng(seq).permutation(len(ordered))
        missing = perm[:_count(len(ordered), spec.eta)]
        if spec.missing_type == "text":
            status[missing] = TEXT_MISSING
        elif spec.missing_type == "image":
            status[missing] = IMAGE_MISSING
        else:
            n_img = _count(len(missing), spec.both_ratio)
            status[missing[:n_img]] = IMAGE_MISSING
            status[missing[n_img:]] = TEXT_MISSING
    return dict(zip(ordered, status.tolist()))


def table_summary(table: dict[str, int]) -> dict[str, float | str | int]:
    """Realized fractions and a hash, for logging next to the run."""
    keys = sorted(table)
    status = np.array([table[k] for k in keys], dtype=np.int8)
    n = max(len(keys), 1)
    digest = hashlib.sha256(("\n".join(keys)).encode() + status.tobytes()).hexdigest()[:16]
    return {
        "n": len(keys),
        "complete": float((status == COMPLETE).sum() / n),
        "text_missing": float((status == TEXT_MISSING).sum() / n),
        "image_missing": float((status == IMAGE_MISSING).sum() / n),
        "hash": digest,
    }


def session_tables(manifest: dict, n_sessions: int, spec: MissingSpec) -> tuple[dict, dict]:
    """({(session, split): table}, {"s<k>_<split>": summary}) for the first n sessions: train
    and test tables (summarised: their realised fractions and hash), and val (the task
    identifier's lambda is chosen on it)."""
    tables, summary = {}, {}
    for k in range(n_sessions):
        splits = manifest["sessions"][k]["splits"]
        for split in ("train", "test"):
            tables[(k, split)] = missing_table(splits[split]["keys"], spec, k, split)
            summary[f"s{k}_{split}"] = table_summary(tables[(k, split)])
        tables[(k, "val")] = missing_table(splits.get("val", {}).get("keys", []), spec, k, "val")
    return tables, summary
