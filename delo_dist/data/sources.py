"""Raw dataset layouts, read into one plan: which items go to which session and split.

A reader only parses metadata (JSON files): images are opened later, by `prepare`. Each
returns a `Plan` whose items carry a stable source id (the sort key behind sample keys),
the image path, one text, global label ids, split and session, plus the rules it applied
(written into the manifest). Layout errors (a missing split, a label outside the declared
classes, a session without samples) raise `SourceError` naming the file and the item;
bad items (missing files, no usable label) are left out and counted in `plan.dropped`.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The raw data contradicts its layout: the message names the file and the item."""


@dataclass
class Item:
    id: str                     # stable source id: keys are assigned in sorted-id order
    image: Path
    text: str
    label: int | list[int]      # global class id(s)
    split: str
    session: int


@dataclass
class Plan:
    dataset: str
    multilabel: bool
    class_names: list[str]
    sessions: list[list[int]]   # global class ids of each session
    items: list[Item]
    metadata: list[Path]        # files read (checksummed into the manifest)
    rules: list[str]
    fingerprint: dict = field(default_factory=dict)  # images inside a dataset: its hashes
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def drop(self, reason: str, item_id: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(item_id)


def load_json(path: Path):
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON: {e}") from e


TEXT_JOIN = ". "  # the reference loaders (RebQ, DeLo) join list-valued texts with it
JOIN_RULE = (f"text: a list of strings is joined with {TEXT_JOIN!r} in order, as the reference "
             "loaders do (empty entries skipped; a string is kept as it is)")


def joined_text(text) -> str:
    """A string, or a list of strings joined with TEXT_JOIN (see JOIN_RULE)."""
    if isinstance(text, str):
        return text.strip()
    if isinstance(text, list):
        return TEXT_JOIN.join(t.strip() for t in text if isinstance(t, str) and t.strip())
    return ""


def check_splits(splits: dict, path: Path, names: dict[str, str]) -> None:
    """names: the file's split name -> ours (e.g. dev -> val)."""
    if not isinstance(splits, dict):
        raise SourceError(f"{path}: expected a mapping of split name -> list of items")
    for raw in names:
        if raw not in splits:
            raise SourceError(f"{path}: no '{raw}' split; expected keys {sorted(names)}")
    extra = sorted(set(splits) - set(names))
    if extra:
        raise SourceError(f"{path}: unknown split(s) {extra}; expected keys {sorted(names)}")


def check_sessions(plan: Plan, where: str) -> None:
    """Every session needs training and test samples (val may be empty)."""
    counts = Counter((it.session, it.split) for it in plan.items)
    for k in range(len(plan.sessions)):
        for split in ("train", "test"):
            if counts[(k, split)] == 0:
                raise SourceError(f"{where}: session {k} (classes {plan.sessions[k]}) has no "
                                  f"'{split}' samples")


# ------------------------------------------------------------------------- cmml-json

def cmml_json(root: Path, name: str | None = None, classes_per_session: int | None = None,
              class_names: Path | None = None) -> Plan:
    """RebQ/DeLo: <root>/<NAME>.json, a list of {image, text, label, split, task_id}."""
    if name is None:
        found = sorted(p.stem for p in root.glob("*.json"))
        if len(found) != 1:
            raise SourceError(f"{root}: pass --name: expected one <NAME>.json, found {found}")
        name = found[0]
    path = root / f"{name}.json"
    rows = load_json(path)
    if not isinstance(rows, list):
        raise SourceError(f"{path}: expected a list of items")
    width = None  # multi-hot length, for multi-label files
    parsed = []
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
        missing = [f for f in ("image", "text", "label", "split", "task_id") if f not in row]
        if missing:
            raise SourceError(f"{where} ({row.get('image')!r}): no field(s) {missing}")
        split, task, label = row["split"], row["task_id"], row["label"]
        split = "val" if split == "dev" else split
        if split not in SPLITS:
            raise SourceError(f"{where} ({row['image']!r}): split {row['split']!r}, expected one of {SPLITS}")
        if not isinstance(task, int) or isinstance(task, bool) or task < 0:
            raise SourceError(f"{where} ({row['image']!r}): task_id {task!r}, expected an int >= 0")
        if i > 0 and isinstance(label, list) != (width is not None):
            raise SourceError(f"{where} ({row['image']!r}): mixes int and multi-hot labels "
                              "(item 0 decides which)")
        if isinstance(label, list):
            if width is None:
                width = len(label)
            if len(label) != width or any(v not in (0, 1) for v in label):
                raise SourceError(f"{where} ({row['image']!r}): label must be a 0/1 multi-hot list "
                                  f"of length {width} (as item 0), got {label!r}")
            label = [c for c, v in enumerate(label) if v]
        elif not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise SourceError(f"{where} ({row['image']!r}): label {label!r}, expected an int >= 0 "
                              "or a multi-hot list")
        parsed.append((i, row, split, task, label))

    tasks = sorted({p[3] for p in parsed})
    n_sessions = max(tasks) + 1 if tasks else 0
    gaps = sorted(set(range(n_sessions)) - set(tasks))
    if gaps or not tasks:
        raise SourceError(f"{path}: session(s) {gaps or [0]} have no samples (task_ids found: {tasks})")
    multilabel = width is not None
    if multilabel:
        cps = classes_per_session or (width // n_sessions if width % n_sessions == 0 else None)
        if cps is None or cps * n_sessions != width:
            raise SourceError(f"{path}: {width} classes do not split into {n_sessions} sessions "
                              f"of {classes_per_session or '?'}: pass --classes-per-session")
        sessions = [list(range(k * cps, (k + 1) * cps)) for k in range(n_sessions)]
        rule = (f"multi-hot labels over {width} classes; session k holds classes "
                f"[{cps}k, {cps}(k+1)); task_id and split kept from the file")
    else:
        sessions = _single_label_sessions(parsed, n_sessions, classes_per_session, path)
        rule = "labels are the file's global ids; session k holds the contiguous range of its " \
               "task_id's labels; task_id and split kept from the file"
    n_classes = sessions[-1][-1] + 1
    names = [f"class_{c}" for c in range(n_classes)]
    metadata = [path]
    if class_names is not None:
        names = load_json(class_names)
        metadata.append(class_names)
        if not isinstance(names, list) or len(names) != n_classes:
            raise SourceError(f"{class_names}: expected a list of {n_classes} class names")
    plan = Plan(f"cmml-json:{name}", multilabel, names, sessions, [], metadata,
                [rule, JOIN_RULE])
    for i, row, split, task, label in parsed:
        image = root / "images" / row["image"]
        plan.items.append(Item(f"{i:08d}", image, joined_text(row["text"]), label, split, task))
    check_sessions(plan, str(path))
    return plan


def _single_label_sessions(parsed, n_sessions, cps, path) -> list[list[int]]:
    if cps:
        sessions = [list(range(k * cps, (k + 1) * cps)) for k in range(n_sessions)]
    else:
        seen = defaultdict(set)
        for _, _, _, task, label in parsed:
            seen[task].add(label)
        sessions = [list(range(min(seen[k]), max(seen[k]) + 1)) for k in range(n_sessions)]
        for k in range(1, n_sessions):
            if sessions[k][0] <= sessions[k - 1][-1]:
                raise SourceError(f"{path}: labels of session {k} ({sessions[k][0]}..{sessions[k][-1]}) "
                                  f"overlap or precede session {k - 1}'s ({sessions[k - 1][0]}.."
                                  f"{sessions[k - 1][-1]}): labels must be global and contiguous per session")
    for i, row, _, task, label in parsed:
        if label not in sessions[task]:
            raise SourceError(f"{path}: item {i} ({row['image']!r}): label {label} is not one of "
                              f"session {task}'s classes {sessions[task][0]}..{sessions[task][-1]}")
    return sessions


# ------------------------------------------------------------------------- food101

def food101(root: Path, sessions: int = 10, classes_per_session: int = 10) -> Plan:
    """images/{train,test}/<class>/<class>_<n>.jpg, text.json, split.json, class_idx.json."""
    idx_path, text_path, split_path = root / "class_idx.json", root / "text.json", root / "split.json"
    class_idx, texts, splits = load_json(idx_path), load_json(text_path), load_json(split_path)
    check_splits(splits, split_path, {s: s for s in SPLITS})
    order = sorted(class_idx, key=lambda c: (class_idx[c], c))
    n_keep = sessions * classes_per_session
    if len(order) < n_keep:
        raise SourceError(f"{idx_path}: {len(order)} classes, need {sessions} x {classes_per_session}")
    kept = {c: i for i, c in enumerate(order[:n_keep])}
    plan = Plan("food101", False, order[:n_keep],
                [list(range(k * classes_per_session, (k + 1) * classes_per_session))
                 for k in range(sessions)], [], [idx_path, text_path, split_path],
                [f"classes ordered by class_idx.json; the first {n_keep} kept "
                 f"(left out: {order[n_keep:]}); session k holds classes "
                 f"[{classes_per_session}k, {classes_per_session}(k+1)) of that order",
                 "split from split.json; val images live under images/train/"])
    for split in SPLITS:
        for name in splits[split]:
            cls = str(name).rsplit("_", 1)[0]
            if cls not in class_idx:
                raise SourceError(f"{split_path}: item {name!r} of '{split}': class {cls!r} "
                                  f"is not in {idx_path.name}")
            if cls not in kept:
                plan.drop("class left out", f"{split}/{name}")
                continue
            folder = "test" if split == "test" else "train"
            image = root / "images" / folder / cls / name
            if not image.is_file():  # some copies keep val images elsewhere
                image = root / "images" / ("train" if folder == "test" else "test") / cls / name
            label = kept[cls]
            plan.items.append(Item(f"{split}/{name}", image, joined_text(texts.get(name, "")),
                                   label, split, label // classes_per_session))
    check_sessions(plan, str(split_path))
    return plan


# ------------------------------------------------------------------------- mmimdb

def mmimdb(root: Path, sessions: int = 5, classes_per_session: int = 4) -> Plan:
    """images/<id>.jpeg, labels/<id>.json ({plot: [..], genres: [..]}), split.json."""
    split_path = root / "split.json"
    splits = load_json(split_path)
    check_splits(splits, split_path, {"train": "train", "dev": "val", "test": "test"})
    ours = {"train": "train", "dev": "val", "test": "test"}
    plan = Plan("mmimdb", True, [], [], [], [split_path], [])
    movies = []  # (split, id, genres, text)
    for raw in ("train", "dev", "test"):
        for mid in splits[raw]:
            mid = str(mid)
            path = root / "labels" / f"{mid}.json"
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
                genres = meta["genres"]
            except (OSError, ValueError, KeyError, TypeError):
                plan.drop("label file missing or unreadable", mid)
                continue
            movies.append((ours[raw], mid, [str(g) for g in genres], joined_text(meta.get("plot", ""))))
    freq = Counter(g for split, _, genres, _ in movies if split == "train" for g in set(genres))
    order = sorted({g for _, _, genres, _ in movies for g in genres}, key=lambda g: (-freq[g], g))
    n_keep = sessions * classes_per_session
    if len(order) < n_keep:
        raise SourceError(f"{root / 'labels'}: {len(order)} genres found, need {sessions} x "
                          f"{classes_per_session}")
    gid = {g: i for i, g in enumerate(order[:n_keep])}
    plan.class_names = order[:n_keep]
    plan.sessions = [list(range(k * classes_per_session, (k + 1) * classes_per_session))
                     for k in range(sessions)]
    plan.metadata.append(root / "labels")
    plan.rules = [
        f"genres ordered by training-split frequency (descending, ties by name); the "
        f"{len(order) - n_keep} least frequent removed ({order[n_keep:]}); session k holds "
        f"genres [{classes_per_session}k, {classes_per_session}(k+1)) of that order",
        "a movie goes to one session, that of its least frequent kept genre (its highest "
        "class id); its labels are all its kept genres (other sessions' are ignored by that "
        "session's head and score); movies with no kept genre are left out",
        "one sample per movie (no per-plot expansion, so missing rates stay exact); its "
        "plots are its text, " + JOIN_RULE.split(": ", 1)[1],
        "split.json dev -> val",
    ]
    for split, mid, genres, text in movies:
        labels = sorted({gid[g] for g in genres if g in gid})
        if not labels:
            plan.drop("no kept genre", mid)
            continue
        plan.items.append(Item(mid, root / "images" / f"{mid}.jpeg", text, labels, split,
                               labels[-1] // classes_per_session))
    check_sessions(plan, str(split_path))
    return plan


READERS = {"cmml-json": cmml_json, "food101": food101, "mmimdb": mmimdb}
