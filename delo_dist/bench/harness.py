"""The timing harness: named rows (one call each), warmed up, then timed round-robin; their
statistics, the ratios between them and the table. It knows rows by name only:
delo_dist/bench/rows.py builds them from the plug-ins' bench entries.

Round-robin (one call per row per round) spreads bursts of load from other processes over
all rows alike, so ratios from one run are what to read on a shared machine, the min-based
ones most. Memory: on a GPU, the model's resident memory plus the call's peak above it
(max_memory_allocated); on CPU, the process RSS growth over the model's build and warm-up
(rough: the allocator reuses freed memory).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import psutil
import torch

from delo_dist import metrics as M
from delo_dist.training.engines import autocast


@dataclass
class Row:
    name: str                                  # "<kind>/<stem>"
    call: Callable[[], Any]
    samples: int                               # samples one call processes (samples/s)
    before: Optional[Callable[[], None]] = None          # untimed, before every call
    threads: Optional[int] = None              # torch threads while it runs (None: as set)
    autocast: bool = True                      # run under --dtype's autocast
    probe: Optional[Callable[[], Any]] = None  # a context manager around the last warm-up
    inspect: Optional[Callable[[Any], dict]] = None      # last warm-up's return -> info
    info: dict = field(default_factory=dict)   # carried into the JSON beside the times
    times_ms: list = field(default_factory=list)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


class Timer:
    """Wall (or process CPU) time of one call, synchronised on a GPU, where it also gives the
    call's peak memory above what was allocated before it."""

    def __init__(self, device: str, precision: str, clock: str = "wall"):
        self.device, self.precision = torch.device(device), precision
        self.cuda = self.device.type == "cuda"
        if self.cuda and clock == "process":
            raise SystemExit("--clock process measures CPU time: use it with --device cpu only")
        self.clock = time.process_time if clock == "process" else time.perf_counter

    def __call__(self, row: Row) -> tuple[float, float, Any]:
        if row.before is not None:
            row.before()
        threads = torch.get_num_threads()
        if row.threads:
            torch.set_num_threads(row.threads)
        extra, before = 0.0, 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        amp = autocast(self.precision, self.device) if row.autocast else contextlib.nullcontext()
        try:
            t0 = self.clock()
            with amp:
                out = row.call()
            if self.cuda:
                torch.cuda.synchronize()
            ms = (self.clock() - t0) * 1e3
        finally:
            torch.set_num_threads(threads)
        if self.cuda:
            extra = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        return ms, extra, out


class Harness:
    def __init__(self, timer: Timer, warmup: int):
        self.timer, self.warmup = timer, max(warmup, 1)   # the last warm-up also probes
        self.rows: dict[str, Row] = {}

    def add(self, rows: list[Row], rss_start: float, resident: int = 0) -> None:
        """Warm up the rows of one freshly built model (rss_start, resident: the process RSS
        and GPU memory before it was built), then register them for timing."""
        extra = {}
        for row in rows:
            if row.name in self.rows:
                raise ValueError(f"bench: two rows named {row.name!r}")
            peaks = []
            for i in range(self.warmup):  # the last one probes: caches as warm as when timed
                last = i == self.warmup - 1
                with row.probe() if (last and row.probe) else contextlib.nullcontext():
                    _, mb, out = self.timer(row)
                if last and row.inspect is not None:
                    row.info.update(row.inspect(out))
                peaks.append(mb)
            extra[row.name] = max(peaks)
        for row in rows:
            if self.timer.cuda:  # this model's weights and optimiser state + the call's working set
                model_mb = (torch.cuda.memory_allocated() - resident) / 2 ** 20
                row.info.update(model_mb=model_mb, peak_mem_mb=model_mb + extra[row.name])
            else:
                row.info["rss_delta_mb"] = rss_mb() - rss_start
            self.rows[row.name] = row

    def run(self, repeats: int, progress: Optional[Callable[[int], None]] = None) -> None:
        for r in range(repeats):
            for row in self.rows.values():
                ms, mb, _ = self.timer(row)
                row.times_ms.append(ms)
                if self.timer.cuda:
                    row.info["peak_mem_mb"] = max(row.info["peak_mem_mb"], row.info["model_mb"] + mb)
            if progress:
                progress(r + 1)

    def results(self) -> dict[str, dict]:
        return {name: {**stats(row.times_ms, row.samples), **row.info}
                for name, row in self.rows.items()}


def mean_std(values: list[float]) -> dict:
    """metrics.mean_std (mean, sample standard deviation) as a dict; std 0 for a single value."""
    mean, std, n = M.mean_std(values)
    return {"mean": mean, "std": 0.0 if std is None else std, "n": n}


def stats(times_ms: list[float], samples: int) -> dict:
    rates = [samples / (t / 1e3) for t in times_ms]
    times = mean_std(times_ms)
    return {"times_ms": times_ms, "median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "mean_ms": times["mean"], "std_ms": times["std"],
            "repeats": len(times_ms), "samples": samples, "samples_per_s": mean_std(rates)}


# ------------------------------------------------------------------ ratios and targets

def target_value(target, complete_fraction: float):
    """(op, bound) with "1 + cf" resolved to 1 + the batch's complete fraction; None stays."""
    if target is None:
        return None
    op, bound = target
    return [op, 1.0 + complete_fraction if bound == "1 + cf" else float(bound)]


def meets(value: float, target) -> bool:
    op, bound = target
    return {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[op]


def ratios(specs: dict, rows: dict, backbone: str) -> tuple[dict, dict]:
    """{"median": {name: value}, "min": {...}} for the specs whose rows ran, and the rest
    {name: [missing rows]} (their plug-in's partner did not run)."""
    out, skipped = {"median": {}, "min": {}}, {}
    for name, (num, den, _) in specs.items():
        num, den = num.format(backbone=backbone), den.format(backbone=backbone)
        missing = [r for r in (num, den) if r not in rows]
        if missing:
            skipped[name] = missing
            continue
        out["median"][name] = rows[num]["median_ms"] / rows[den]["median_ms"]
        out["min"][name] = rows[num]["min_ms"] / rows[den]["min_ms"]
    return out, skipped


def paired_rates(a: dict, b: dict) -> dict:
    """Row a against row b in samples/s, timed alternately: their means +/- std and the
    per-round difference a - b (mean +/- std); within noise when |mean difference| <= 2
    standard errors of it."""
    ra = [a["samples"] / (t / 1e3) for t in a["times_ms"]]
    rb = [b["samples"] / (t / 1e3) for t in b["times_ms"]]
    diff = mean_std([x - y for x, y in zip(ra, rb)])
    se = diff["std"] / math.sqrt(diff["n"])
    sa, sb = mean_std(ra), mean_std(rb)
    return {"a": sa, "b": sb, "difference": diff, "ratio_of_means": sa["mean"] / sb["mean"],
            "within_noise": abs(diff["mean"]) <= 2 * se}
