"""Hugging Face `datasets` as a raw source for `prepare hf`.

    python -m delo_dist.data.prepare hf --dataset PATH_OR_ID [--config NAME] \
        --image-column image --text-column text --label-column label \
        (--splits train=train,val=validation,test=test | --split-column split) \
        --sessions 4 --out data/mine

--dataset is a folder written by `save_to_disk` (read with `load_from_disk`), else anything
`load_dataset` takes: a local dataset script or data files, or a hub id where reachable.
Labels: a ClassLabel, an int, a class name, or a list of those (multi-label). Classes are
ordered by id (ClassLabel or int columns) or by name (string columns). --sessions N cuts
that order into N equal sessions (--classes-per-session C keeps the first N x C classes);
--sessions "a,b|c,d" lists each session's classes (names or ids), sessions split by "|".
A single-label sample goes to its class's session; a multi-label sample to the session of
its last kept class in session order (the rule mmimdb uses), labelled with all its kept
classes. Images stay inside the Arrow data: `HFImage` is a picklable reference that image
workers open themselves; nothing is copied to disk but the shards.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from delo_dist.data.sources import JOIN_RULE, Item, Plan, SourceError, check_sessions, joined_text

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
_OPEN: dict = {}  # per process: (dataset, config) -> loaded dataset (Arrow: memory-mapped)


def load(dataset: str, config: str | None):
    """A DatasetDict or Dataset from a save_to_disk folder, a local script or files, or a hub id."""
    key = (dataset, config)
    if key not in _OPEN:
        import datasets
        path = Path(dataset).expanduser()
        try:
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(dataset, name=config)
        except Exception as e:  # datasets raises many kinds: name what was asked and why
            raise SourceError(f"{dataset}: cannot load it as a Hugging Face dataset (a "
                              f"save_to_disk folder, a local script or data files, or a hub id "
                              f"reachable from here): {type(e).__name__}: {e}") from e
        _OPEN[key] = ds
    return _OPEN[key]


@dataclass(frozen=True)
class HFImage:
    """Row `row` of split `split` (None: a single Dataset), column `column`."""
    dataset: str
    config: str | None
    split: str | None
    row: int
    column: str

    def open(self):
        from PIL import Image
        ds = load(self.dataset, self.config)
        value = (ds[self.split] if self.split is not None else ds)[self.row][self.column]
        if value is None:
            raise FileNotFoundError(f"{self}: no image")
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        if isinstance(value, str):
            return Image.open(value)
        raise FileNotFoundError(f"{self}: image value {type(value).__name__} not readable")


def parse_splits(text: str) -> dict[str, str]:
    """'train=train,val=validation,test=test' -> {ours: theirs}; val may be left out."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, _, theirs = part.partition("=")
        if ours not in ("train", "val", "test") or not theirs:
            raise SourceError(f"--splits: {part!r}, expected OURS=THEIRS with OURS in train, val, test")
        out[ours] = theirs
    for need in ("train", "test"):
        if need not in out:
            raise SourceError(f"--splits {text!r}: no '{need}=...' entry (train and test are required)")
    return out


def _feature_names(feature) -> list[str] | None:
    """Class names of a ClassLabel, or of the ClassLabel inside a list feature."""
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    inner = getattr(feature, "feature", None)
    return _feature_names(inner) if inner is not None else None


def hf_dataset(root, dataset: str | None = None, config: str | None = None,
               image_column: str = "image", text_column: str = "text", label_column: str = "label",
               splits: str | None = None, split_column: str | None = None,
               sessions: str = "1", classes_per_session: int | None = None) -> Plan:
    dataset = str(dataset or root)
    if (splits is None) == (split_column is None):
        raise SourceError(f"{dataset}: give exactly one of --splits and --split-column")
    ds = load(dataset, config)
    parts = _parts(ds, dataset, splits, split_column)              # (their split, ours or None, table)
    for their, _, table in parts:
        missing = [c for c in (image_column, text_column, label_column, split_column)
                   if c is not None and c not in table.column_names]
        if missing:
            raise SourceError(f"{dataset} split {their!r}: no column(s) {missing}; columns: "
                              f"{table.column_names}")
    feature = parts[0][2].features[label_column]
    rows = []                                                     # (their split, row, ours, raw label, text)
    for their, ours, table in parts:
        cols = table.select_columns([c for c in (text_column, label_column, split_column) if c])
        texts, labels = cols[text_column], cols[label_column]
        split_of = cols[split_column] if split_column else None
        for i in range(len(cols)):
            split = ours or SPLIT_NAMES.get(str(split_of[i]).lower())
            if split is None:
                raise SourceError(f"{dataset} split {their!r} row {i}: {split_column}="
                                  f"{split_of[i]!r}, expected one of {sorted(SPLIT_NAMES)}")
            rows.append((their, i, split, labels[i], texts[i]))
    multilabel = any(isinstance(r[3], (list, tuple)) for r in rows)
    names, to_id, order_rule = _classes(rows, _feature_names(feature), multilabel, dataset)
    session_ids = _sessions(sessions, classes_per_session, names, dataset)
    session_of = {c: k for k, ids in enumerate(session_ids) for c in ids}
    kept = [c for ids in session_ids for c in ids]
    gid = {c: i for i, c in enumerate(kept)}                      # global id in session order
    plan = Plan(f"hf:{dataset}" + (f":{config}" if config else ""), multilabel,
                [names[c] for c in kept],
                [[gid[c] for c in ids] for ids in session_ids], [], [],
                [order_rule, _session_rule(sessions, session_ids, names, len(names) - len(kept)),
                 "splits: " + (f"--splits {splits}" if splits else f"column {split_column!r} "
                               f"(values {sorted(SPLIT_NAMES)})"), JOIN_RULE])
    plan.fingerprint = {their or "dataset": table._fingerprint for their, _, table in parts}
    for their, i, split, raw, text in rows:
        item_id = f"{their}/{i:08d}"
        ids = [to_id(v, item_id) for v in (raw if multilabel else [raw])]
        ours = sorted({gid[c] for c in ids if c in gid})
        if not ours:
            plan.drop("class left out" if not multilabel else "no kept class", item_id)
            continue
        session = max(session_of[kept[g]] for g in ours)
        image = HFImage(dataset, config, their if their != "" else None, i, image_column)
        plan.items.append(Item(item_id, image, joined_text(text), ours if multilabel else ours[0],
                               split, session))
    check_sessions(plan, dataset)
    return plan


def _parts(ds, dataset, splits, split_column):
    import datasets
    if isinstance(ds, datasets.DatasetDict):
        available = list(ds.keys())
        if splits is not None:
            wanted = parse_splits(splits)
            for ours, theirs in wanted.items():
                if theirs not in ds:
                    raise SourceError(f"{dataset}: no split {theirs!r} (for {ours}); splits: {available}")
            return [(theirs, ours, ds[theirs]) for ours, theirs in wanted.items()]
        return [(name, None, ds[name]) for name in available]
    if splits is not None:
        raise SourceError(f"{dataset}: a single split dataset has no named splits: use --split-column")
    return [("", None, ds)]


def _classes(rows, feature_names, multilabel, dataset):
    """Class names by id, a value -> id function, and the ordering rule."""
    values = {v for r in rows for v in (r[3] if multilabel else [r[3]])}
    if any(v is None for v in values):
        bad = next(f"{r[0]}/{r[1]}" for r in rows if r[3] is None or (multilabel and None in r[3]))
        raise SourceError(f"{dataset}: row {bad} has no label")
    if all(isinstance(v, str) for v in values):
        names = sorted(values) if feature_names is None else feature_names
        index = {n: i for i, n in enumerate(names)}
        rule = "classes: label names in sorted order" if feature_names is None else \
            "classes: the ClassLabel's order"

        def to_id(v, item):
            if v not in index:
                raise SourceError(f"{dataset}: row {item}: label {v!r} is not a class ({names[:8]}...)")
            return index[v]
        return names, to_id, rule
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        n = max(values) + 1
        names = feature_names or [f"class_{c}" for c in range(n)]
        if min(values) < 0 or n > len(names):
            raise SourceError(f"{dataset}: label ids {min(values)}..{n - 1} outside the "
                              f"{len(names)} classes of the label feature")
        return names, (lambda v, item: v), ("classes: the ClassLabel's ids" if feature_names
                                            else "classes: the integer labels 0..max")
    raise SourceError(f"{dataset}: labels must be ints, class names, or lists of them; got "
                      f"{sorted({type(v).__name__ for v in values})}")


def _sessions(spec: str, cps: int | None, names: list[str], dataset: str) -> list[list[int]]:
    spec = str(spec).strip()
    if spec.isdigit():
        n = int(spec)
        per = cps or (len(names) // n if n and len(names) % n == 0 else None)
        if not n or per is None or n * per > len(names):
            raise SourceError(f"{dataset}: {len(names)} classes do not split into {spec} equal "
                              f"sessions: pass --classes-per-session or list the classes")
        return [list(range(k * per, (k + 1) * per)) for k in range(n)]
    index = {n: i for i, n in enumerate(names)}
    out = []
    for k, group in enumerate(spec.split("|")):
        ids = []
        for c in filter(None, (x.strip() for x in group.split(","))):
            cid = int(c) if c.isdigit() and c not in index else index.get(c)
            if cid is None or not 0 <= cid < len(names):
                raise SourceError(f"--sessions: session {k}: {c!r} is not a class of {dataset} "
                                  f"({names[:8]}...)")
            ids.append(cid)
        if not ids:
            raise SourceError(f"--sessions: session {k} lists no class")
        out.append(ids)
    flat = [c for ids in out for c in ids]
    if len(set(flat)) != len(flat):
        raise SourceError(f"--sessions: a class is listed in two sessions: {spec!r}")
    return out


def _session_rule(spec, session_ids, names, left_out) -> str:
    how = f"{spec} equal sessions of the class order" if str(spec).strip().isdigit() else \
        "sessions as listed by --sessions"
    return (f"{how}: " + "; ".join(f"session {k}: {[names[c] for c in ids]}"
                                   for k, ids in enumerate(session_ids))
            + f"; {left_out} classes left out; global ids follow session order")
