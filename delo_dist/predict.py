"""Predict with a trained model from the command line.

    python -m delo_dist.predict CHECKPOINT --image cat.jpg --text "a spicy soup"
    python -m delo_dist.predict CHECKPOINT --input pairs.jsonl --out predictions.jsonl
    python -m delo_dist.predict CHECKPOINT --input pairs.csv --out predictions.csv
    python -m delo_dist.predict CHECKPOINT --folder photos/ --out predictions.jsonl
    python -m delo_dist.predict CHECKPOINT --shards data/synthetic [--split test] --summary s.json

CHECKPOINT: a training checkpoint (<output_dir>/checkpoints/<tag>), a run folder (its
newest checkpoint) or an export (python -m delo_dist.export). Inputs:
  --image / --text   one pair (either may be left out: that modality is missing)
  --input FILE       JSONL (objects with "image" and/or "text", optional "id") or CSV (a
                     header with image and/or text columns, optional id); an empty value is
                     a missing modality; relative image paths are read from the file's folder
  --folder DIR       every image in DIR (sorted by name), with DIR/<name>.txt as its text
                     when there is one
  --shards DIR       prepared shards: the split (test) of each session the model has
                     finished, with the recipe's missing-modality tables (--missing none:
                     all complete); prints accuracy / macro-F1 against the labels per session
                     and their mean, scored as the trainer scores its evaluation
Writes one line per sample (JSONL to --out or stdout; CSV when --out ends in .csv; fields in
delo_dist/inference.py) and a summary on stderr (--summary FILE: also as JSON): counts by
availability and by session chosen, errors, truncated texts, samples/s. A sample that cannot
be used (an unreadable image, both modalities missing, a bad line) gets an entry with its
error and the rest goes on. A folder that is not a checkpoint, or one written by an
incompatible version, stops with one line (exit 2).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CSV_FIELDS = ["index", "id", "image", "text", "availability", "session", "session_confidence",
              "classes", "class_ids", "scores", "truncated", "label_ids", "error"]


class InputError(ValueError):
    """An input file or folder that cannot be read at all (one line, exit 2)."""


# ------------------------------------------------------------------ input sources
# Each yields (fields echoed into the output, image, text); image None or text None: missing.

def _one_pair(image: str | None, text: str | None) -> Iterator[tuple[dict, object, object]]:
    yield {"image": image, "text": text}, image, text


def _table(path: Path) -> tuple[int, Iterator]:
    """JSONL or CSV rows -> (count, items). A bad JSONL line becomes an error item."""
    if not path.is_file():
        raise InputError(f"--input {path}: no such file")
    base = path.parent
    resolve = lambda v: str(base / Path(v).expanduser())   # noqa: E731 (absolute stays)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        header = set(rows[0]) if rows else set()
        if rows and not ({"image", "text"} & header):
            raise InputError(f"--input {path}: expected a header with an 'image' and/or a 'text' "
                             f"column, got {sorted(header)}")
        def items():
            for row in rows:
                img, txt = (row.get("image") or "").strip(), row.get("text") or ""
                yield ({"id": row.get("id"), "image": img or None, "text": txt or None},
                       resolve(img) if img else None, txt or None)
        return len(rows), items()
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]

    def items():
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                yield {"line": n, "error": f"{path}:{n}: not a JSON object ({e})"}, None, None
                continue
            img, txt = obj.get("image") or None, obj.get("text") or None
            yield ({"id": obj.get("id"), "image": img, "text": txt},
                   resolve(img) if img else None, txt)
    return len(lines), items()


def _folder(root: Path) -> tuple[int, Iterator]:
    if not root.is_dir():
        raise InputError(f"--folder {root}: no such folder")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def items():
        for p in images:
            txt = p.with_suffix(".txt")
            text = txt.read_text(errors="replace") if txt.is_file() else None
            yield {"image": str(p), "text": text}, str(p), text
    return len(images), items()


# ------------------------------------------------------------------ running

class Progress:
    """A tqdm bar on a terminal, plain lines in a log; nothing for short inputs."""

    def __init__(self, total: int | None, every: int):
        from tqdm import tqdm
        self.total, self.done, self.every, self.t0 = total, 0, every, time.time()
        self.tty = sys.stderr.isatty()
        long = total is None or total > every
        self.bar = tqdm(total=total, desc="predict", unit="sample", file=sys.stderr,
                        disable=not (self.tty and long), leave=False)
        self.plain = long and not self.tty    # a log: one line every `every` samples
        self._next = every

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.plain and self.done >= self._next:
            self._next += self.every
            rate = self.done / max(time.time() - self.t0, 1e-9)
            total = f"/{self.total}" if self.total else ""
            print(f"predict: {self.done}{total} samples ({rate:.1f}/s)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        self.bar.close()


class Writer:
    def __init__(self, out: Path | None):
        self.csv = out is not None and out.suffix.lower() == ".csv"
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        self.f = out.open("w", newline="") if out is not None else sys.stdout
        self.writer = (csv.DictWriter(self.f, CSV_FIELDS, extrasaction="ignore")
                       if self.csv else None)
        if self.writer:
            self.writer.writeheader()

    def write(self, rec: dict) -> None:
        if self.writer:
            flat = {k: "|".join(str(x) for x in v) if isinstance(v, list) else v
                    for k, v in rec.items()}
            self.writer.writerow(flat)
        else:
            self.f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.f is not sys.stdout:
            self.f.close()
        else:
            self.f.flush()


def run_pairs(model, items: Iterator, write, mode: str, session: int | None,
              progress: Progress) -> Counter:
    """Predict (fields, image, text) items in batches of the model's batch size."""
    stats: Counter = Counter()
    index = 0
    batch: list = []

    def flush():
        nonlocal index
        usable = [(f, i, t) for f, i, t in batch if "error" not in f]
        results = iter(model.predict_iter(((i, t) for _, i, t in usable), mode, session))
        for fields, _, _ in batch:
            rec = {"index": index, **fields}
            if "error" not in fields:
                rec.update(next(results))
            _count(stats, rec)
            write(rec)
            index += 1
        progress.update(len(batch))
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == model.batch_size:
            flush()
    if batch:
        flush()
    return stats


def _count(stats: Counter, rec: dict) -> None:
    stats["samples"] += 1
    if rec.get("error"):
        stats["errors"] += 1
        return
    stats[f"availability:{rec['availability']}"] += 1
    stats[f"session:{rec['session']}"] += 1
    stats["truncated_texts"] += bool(rec.get("truncated"))


def run_shards(model, root: Path, split: str, missing: str, write, mode: str,
               session: int | None, progress_every: int) -> tuple[Counter, dict]:
    """Predict every seen session's `split` of prepared shards; score against the labels."""
    from delo_dist.data.missing import MissingSpec, missing_table
    from delo_dist.data.shards import read_manifest
    from delo_dist.data.stream import SessionStream
    from delo_dist.models.task_id import AVAILABILITY
    from delo_dist.training.evaluation import Scoring, score
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--shards {root}: {e}")
    if manifest["num_classes"] != model.info.num_classes:
        raise InputError(f"--shards {root}: {manifest['num_classes']} classes, the model knows "
                         f"{model.info.num_classes}: not data of the model's task")
    sessions = min(model.seen, len(manifest["sessions"]))
    d = model.recipe.data
    spec = MissingSpec(d.eta, d.missing_type, d.both_ratio, d.missing_seed)
    total = sum(manifest["sessions"][k]["splits"][split]["count"] for k in range(sessions))
    progress = Progress(total, model.batch_size * progress_every)
    stats: Counter = Counter()
    scoring = Scoring.of(manifest, model.info.multilabel_classes)
    perf, routing = [], []
    index = 0
    for k in range(sessions):
        entry = manifest["sessions"][k]["splits"][split]
        table = missing_table(entry["keys"], spec, k, split) if missing == "recipe" else {}
        cut: dict[str, bool] = {}   # key -> text truncated by the collate

        def collate(samples, cut=cut):
            cut.update({s["key"]: s["status"] != 1 and model.truncates(s["txt"]) for s in samples})
            return model.model.backbone.collate(samples)
        stream = SessionStream(root, manifest, k, split, model.batch_size, collate, table,
                               train=False, max_bad=entry["count"])  # bad: an error entry, go on
        rows = []
        for batch in stream:
            labels = batch["labels"]
            for j, res in enumerate(model.predict_batch(batch, mode, session)):
                label = labels[j] if isinstance(labels, list) else int(labels[j])
                key = batch["keys"][j]
                rec = {"index": index, "key": key, "true_session": k,
                       "label_ids": label if isinstance(label, list) else [label], **res,
                       "truncated": cut.pop(key, False)}
                pred = rec["class_ids"] if model.multilabel else rec["class_ids"][0]
                avail = AVAILABILITY.index(rec["availability"])
                rows.append((rec["key"], label, pred, None, rec["session"], avail))
                _count(stats, rec)
                write(rec)
                index += 1
            progress.update(len(batch["keys"]))
        for bad in stream.bad:
            rec = {"index": index, "key": bad["key"], "true_session": k,
                   "error": f"{bad['shard']}: {bad['error']}"}
            _count(stats, rec)
            write(rec)
            index += 1
        p, _, r = score(sorted(rows), k, model.seen, scoring)
        perf.append(p)
        routing.append(r if mode == "task_agnostic" else None)
    progress.close()
    metric = "accuracy" if not model.multilabel else f"macro_f1/{model.info.multilabel_classes}"
    return stats, {"split": split, "missing": missing, "metric": metric, "performance": perf,
                   "mean_performance": sum(perf) / len(perf) if perf else None,
                   "routing_accuracy": routing}


def summary_lines(summary: dict) -> list[str]:
    lines = [f"predicted {summary['samples']} samples in {summary['wall_s']:.1f}s "
             f"({summary['samples_per_s']:.1f}/s) with {summary['model']}",
             "by availability: " + ", ".join(f"{k} {v}" for k, v in
                                             summary["by_availability"].items()),
             "by session chosen: " + ", ".join(f"{k}: {v}" for k, v in
                                               summary["by_session"].items()),
             f"errors: {summary['errors']}; truncated texts: {summary['truncated_texts']} "
             f"(longer than the trained {summary['max_text_len']} tokens)"]
    if "shards" in summary:
        s = summary["shards"]
        cells = " ".join(f"{100 * p:.2f}" for p in s["performance"])
        lines.append(f"{s['metric']} on the {s['split']} split, per session: [{cells}]  mean "
                     f"{100 * s['mean_performance']:.2f}")
        if s["routing_accuracy"] and s["routing_accuracy"][0] is not None:
            lines.append("routing accuracy per session: [" + " ".join(
                f"{100 * r:.1f}" for r in s["routing_accuracy"]) + "]")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m delo_dist.predict",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="training checkpoint, run folder or export")
    src = ap.add_argument_group("input (one kind)")
    src.add_argument("--image", help="one pair: the image (path)")
    src.add_argument("--text", help="one pair: the text")
    src.add_argument("--input", type=Path, help="JSONL or CSV of image paths and texts")
    src.add_argument("--folder", type=Path, help="a folder of images (+ same-name .txt)")
    src.add_argument("--shards", type=Path, help="prepared shards (scored against their labels)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--missing", default="recipe", choices=("recipe", "none"),
                    help="with --shards: the recipe's missing-modality tables, or none")
    ap.add_argument("--out", type=Path, help="output file (.jsonl, or .csv); default stdout")
    ap.add_argument("--summary", type=Path, help="also write the summary as JSON here")
    ap.add_argument("--mode", default="task_agnostic", choices=("task_agnostic", "oracle"))
    ap.add_argument("--session", type=int, help="with --mode oracle: the session to use "
                    "(with --shards, default: each sample's own)")
    ap.add_argument("--batch-size", type=int, help="default: the recipe's eval.batch_size")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--precision", choices=("no", "bf16", "fp16"), help="default: as trained")
    ap.add_argument("--backbone", help="a local copy of the pretrained backbone")
    ap.add_argument("--manifest", type=Path, help="shards folder whose manifest names the "
                    "classes (training checkpoints whose data.shards is elsewhere)")
    args = ap.parse_args(argv)
    kinds = [k for k, v in (("--image/--text", args.image is not None or args.text is not None),
                            ("--input", args.input), ("--folder", args.folder),
                            ("--shards", args.shards)) if v]
    if len(kinds) != 1:
        ap.error(f"give one kind of input, got {kinds or 'none'}")

    from delo_dist.inference import AVAILABILITY, CheckpointError, load
    try:
        model = load(args.checkpoint, device=args.device, precision=args.precision,
                     backbone=args.backbone, shards=args.manifest, batch_size=args.batch_size)
        if args.mode == "task_agnostic" and args.session is not None:
            raise InputError("--session is for --mode oracle")
        if args.mode == "oracle" and not args.shards:
            model.check_mode("oracle", args.session)
    except (CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.shards:
        import delo_dist.data.stream, delo_dist.training.evaluation  # noqa: F401,E401 - before the clock
    writer = Writer(args.out)
    t0 = time.time()
    summary: dict = {}
    try:
        if args.shards:
            stats, summary["shards"] = run_shards(model, args.shards, args.split, args.missing,
                                                  writer.write, args.mode, args.session, 10)
        else:
            count, items = ((1, _one_pair(args.image, args.text)) if kinds[0] == "--image/--text"
                            else _table(args.input) if args.input else _folder(args.folder))
            progress = Progress(count, model.batch_size * 10)
            stats = run_pairs(model, items, writer.write, args.mode, args.session, progress)
            progress.close()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        writer.close()
    wall = time.time() - t0
    summary = {
        "samples": stats["samples"], "errors": stats["errors"],
        "truncated_texts": stats["truncated_texts"],
        "by_availability": {a: stats[f"availability:{a}"] for a in AVAILABILITY},
        "by_session": {k.split(":", 1)[1]: v for k, v in sorted(stats.items())
                       if k.startswith("session:")},
        "wall_s": wall, "samples_per_s": stats["samples"] / max(wall, 1e-9),
        "max_text_len": model.model.backbone.max_text_len, "model": repr(model),
        "mode": args.mode, **summary,
    }
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
