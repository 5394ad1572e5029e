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
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from delo_dist.data.shards import iter_tar_samples


class SessionStream(IterableDataset):
    def __init__(self, root: str | Path, manifest: dict, session: int, split: str,
                 batch_size: int, collate: Callable, status: dict[str, int], *,
                 train: bool, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle_buffer: int = 256, skip_batches: int = 0, accum: int = 1):
        entry = manifest["sessions"][session]["splits"][split]
        self.urls = [str(Path(root) / s) for s in entry["shards"]]
        self.count = entry["count"]
        self.session, self.split = session, split
        self.batch_size, self.collate, self.status = batch_size, collate, status
        self.train, self.rank, self.world = train, rank, world
        self.seed, self.epoch, self.shuffle_buffer = seed, epoch, shuffle_buffer
        self.skip_batches = skip_batches   # resume mid-epoch: global batches already trained
        self.accum = accum                 # micro-batches per rank and global batch
        self.stats = {"skipped": 0}

    def __len__(self) -> int:
        if self.train:
            steps = self.count // (self.batch_size * self.accum * self.world) - self.skip_batches
            return max(steps, 0) * self.accum
        local = len(range(self.rank, self.count, self.world))
        return -(-local // self.batch_size)

    def _raw(self):
        """Raw samples in stream order; incomplete ones (a truncated tar) dropped and counted
        here, before batching, so that every reader drops the same ones."""
        for raw in self._ordered():
            if "json" in raw and ("jpg" in raw or "txt" in raw):
                yield raw
            else:
                self.stats["skipped"] += 1

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
                    yield self.collate([self._decode(r) for r in chunk])
                chunk, index = [], index + 1
        if chunk and index % nw == wid:
            yield self.collate([self._decode(r) for r in chunk])


    def _micro(self, chunk: list, start: int):
        batch = self.collate([self._decode(r) for r in chunk[start:start + self.batch_size]])
        if isinstance(batch, dict):
            complete = sum(self.status.get(r["__key__"], 0) == 0 for r in chunk)
            batch["complete_per_micro"] = torch.full((self.batch_size,), complete / self.accum)
        return batch


def make_loader(stream: SessionStream, num_workers: int = 0) -> DataLoader:
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the global
    # torch RNG, and a resumed job, creating its iterator at another point, would diverge.
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=2 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))
