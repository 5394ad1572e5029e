"""Streaming one session's split from its WebDataset shards, identically on any world size.

Training: every reader (rank x worker) walks the same stream: shards in an order seeded by
(seed, session, epoch), then a seeded shuffle buffer. The stream is cut into *global*
batches of batch_size x world; rank r keeps slice r of each, and worker w of a rank
processes global batches w, w + W, ... (the DataLoader returns workers' batches in round
robin, so order is kept). Consequences, all by construction:
  - the same global batches on 1 rank or on N: the same experiment, not a different one;
  - every rank runs exactly floor(N / global_batch) steps: no hang, whatever the number of
    shards (3 shards on 2 ranks x 2 workers is fine) and no shards >= ranks x workers rule;
  - readers skip other readers' samples before decoding: each sample is decoded once.
With gradient accumulation (`accum` > 1) a global batch is batch_size x accum x world
samples: rank r's slice is cut into accum micro-batches in stream order, and micro-batch j
of the rank goes to worker j % W. So 1 device x accum 4 trains on exactly the samples of
4 devices x accum 1 at every optimizer step. Each training micro-batch that is a dict also
carries `complete_per_micro` (B,): the complete samples (status 0) of its whole global
batch / accum, so that per-sample loss terms can be normalised over the optimizer step.
The cost: every reader reads every tar byte of the session's split (sequential I/O, no
decoding), which is cheap next to JPEG decoding for a session's worth of shards.

Evaluation: sample i of the split goes to rank i % world: each test sample is seen exactly
once across ranks; `gather` puts the predictions back together.

Integrity: every reader checks every raw sample before batching (JSON parses, the JPEG's
header parses and its end marker is there: no pixel decoding), so every rank makes the same
skip decision and batches stay aligned. A bad sample is skipped and recorded with its key
and shard; more than `max_bad` of them stops the job. At the end of the stream the samples
read are counted against the manifest, per shard where it records counts: a cut tar or a
manifest with wrong counts stops the job naming the shard, the split and both counts.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from delo_dist.data.files import atomic_write_text
from delo_dist.data.shards import DataIntegrityError, iter_tar_samples


class SessionStream(IterableDataset):
    def __init__(self, root: str | Path, manifest: dict, session: int, split: str,
                 batch_size: int, collate: Callable, status: dict[str, int], *,
                 train: bool, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle_buffer: int = 256, skip_batches: int = 0, max_bad: int = 0,
                 faults_path: Path | None = None, accum: int = 1):
        entry = manifest["sessions"][session]["splits"][split]
        self.root = Path(root)
        self.urls = [str(self.root / s) for s in entry["shards"]]
        self.count = entry["count"]
        self.shard_counts = {s: f["count"] for s, f in entry.get("files", {}).items()}
        self.max_bad, self.faults_path = max_bad, faults_path
        self.session, self.split = session, split
        self.batch_size, self.collate, self.status = batch_size, collate, status
        self.train, self.rank, self.world = train, rank, world
        self.seed, self.epoch, self.shuffle_buffer = seed, epoch, shuffle_buffer
        self.skip_batches = skip_batches   # resume mid-epoch: global batches already trained
        self.accum = accum                 # micro-batches per rank and global batch
        self.stats = {"skipped": 0, "read_errors": []}
        self.bad: list[dict] = []   # undecodable samples: key, shard, why

    def __len__(self) -> int:
        if self.train:
            steps = self.count // (self.batch_size * self.accum * self.world) - self.skip_batches
            return max(steps, 0) * self.accum
        local = len(range(self.rank, self.count, self.world))
        return -(-local // self.batch_size)

    def _raw(self):
        """Raw samples in stream order, bad ones skipped (the same on every reader), counted
        against the manifest at the end."""
        where = f"session {self.session} {self.split}"
        seen: dict[str, int] = {}
        self.bad = []
        for raw in self._ordered():
            shard = self._shard(raw.get("__url__", "?"))
            if "json" not in raw or not ("jpg" in raw or "txt" in raw):
                continue  # members lost (a cut tar): not a sample; the count below stops the job
            seen[shard] = seen.get(shard, 0) + 1
            problem = sample_problem(raw)
            if problem is None:
                yield raw
                continue
            self.bad.append({"session": self.session, "split": self.split,
                             "key": raw.get("__key__"), "shard": shard, "error": problem})
            if len(self.bad) > self.max_bad:
                raise DataIntegrityError(
                    f"{where}: sample {raw.get('__key__')} in {self.root / shard} cannot be "
                    f"decoded ({problem}); {len(self.bad)} bad sample(s) exceed the allowance of "
                    f"{self.max_bad} for this split (data.max_bad_samples, "
                    "data.max_bad_train_fraction)")
        self._check_counts(seen, where)
        self._report()

    def _shard(self, url: str) -> str:
        try:
            return Path(url).relative_to(self.root).as_posix()
        except ValueError:
            return url

    def _check_counts(self, seen: dict, where: str) -> None:
        total = sum(seen.values())
        wrong = [f"{s}: {seen.get(s, 0)} read, manifest {n}" for s, n in self.shard_counts.items()
                 if seen.get(s, 0) != n]
        if total == self.count and not wrong:
            return
        errors = "; ".join(self.stats["read_errors"][:3])
        shards = "; ".join(wrong) if wrong else "shards " + ", ".join(self._shard(u) for u in self.urls)
        raise DataIntegrityError(
            f"{where} of {self.root}: {total} samples read, the manifest says {self.count} "
            f"({shards}){' read errors: ' + errors if errors else ''}. A cut or changed tar, or "
            "a manifest that does not describe these shards: re-prepare them")

    def _report(self) -> None:
        """One reader (rank 0, worker 0) writes the bad samples it skipped, for the trainer."""
        info = get_worker_info()
        if self.faults_path is None or self.rank != 0 or (info is not None and info.id != 0):
            return
        self.faults_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.faults_path, json.dumps(self.bad))   # a full disk: no half file

    def _ordered(self):
        urls = list(self.urls)
        if self.train:
            rng = random.Random(f"{self.seed}-{self.session}-{self.epoch}")
            rng.shuffle(urls)
            stream = iter_tar_samples(urls, self.stats)
            shuffle = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100),
                                  rng=random.Random(f"{self.seed}-{self.session}-{self.epoch}-buf"))
            return shuffle(stream)
        return iter_tar_samples(urls, self.stats)

    def _decode(self, raw: dict) -> dict:
        meta = json.loads(raw["json"])
        key = raw["__key__"]
        return {"key": key, "jpg": raw.get("jpg"), "txt": raw.get("txt", b"").decode("utf-8"),
                "label": meta["label"], "session": meta["session"],
                "status": self.status.get(key, 0)}

    def _batch(self, raws: list[dict]) -> dict:
        try:
            return self.collate([self._decode(r) for r in raws])
        except Exception as e:  # the cheap check passed, the decode did not: name the samples
            names = ", ".join(f"{r['__key__']} ({self._shard(r.get('__url__', '?'))})" for r in raws)
            raise DataIntegrityError(f"session {self.session} {self.split}: a batch of {names} "
                                     f"failed to decode: {e!r}") from e

    def _micro(self, chunk: list, start: int):
        """Micro-batch chunk[start:start + batch_size] of a global batch; it carries the global
        batch's complete-sample count / accum (the auxiliary losses' normaliser)."""
        batch = self._batch(chunk[start:start + self.batch_size])
        if isinstance(batch, dict):
            complete = sum(self.status.get(r["__key__"], 0) == 0 for r in chunk)
            batch["complete_per_micro"] = torch.full((self.batch_size,), complete / self.accum)
        return batch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        chunk, index = [], 0
        if self.train:
            b, accum = self.batch_size, self.accum
            size, lo = b * accum * self.world, b * accum * self.rank
            for raw in self._raw():
                chunk.append(raw)
                if len(chunk) == size:  # one global batch: accum micro-batches per rank
                    if index >= self.skip_batches:
                        for m in range(accum):
                            if ((index - self.skip_batches) * accum + m) % nw == wid:
                                yield self._micro(chunk, lo + m * b)
                    chunk, index = [], index + 1
            return  # the last partial global batch is dropped on every rank alike
        for i, raw in enumerate(self._raw()):
            if i % self.world != self.rank:
                continue
            chunk.append(raw)
            if len(chunk) == self.batch_size:
                if index % nw == wid:
                    yield self._batch(chunk)
                chunk, index = [], index + 1
        if chunk and index % nw == wid:
            yield self._batch(chunk)


def sample_problem(raw: dict) -> str | None:
    """Why a raw sample cannot be used, or None. Cheap: the JPEG header is parsed and its end
    marker checked, its pixels are not decoded (the collate does that once)."""
    try:
        meta = json.loads(raw["json"])
        if "label" not in meta or "session" not in meta:
            return "json member without label/session"
        if "txt" in raw:
            raw["txt"].decode("utf-8")
        if "jpg" in raw:
            with Image.open(io.BytesIO(raw["jpg"])) as img:
                if img.format != "JPEG":
                    return f"jpg member is {img.format}, not JPEG"
            if not raw["jpg"].rstrip(b"\0").endswith(b"\xff\xd9"):
                return "JPEG without its end marker (truncated)"
    except Exception as e:  # noqa: BLE001 - any failure to parse makes the sample unusable
        return f"{type(e).__name__}: {e}"
    return None


def make_loader(stream: SessionStream, num_workers: int = 0) -> DataLoader:
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the global
    # torch RNG, and a resumed job, creating its iterator at another point, would diverge.
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=2 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))
