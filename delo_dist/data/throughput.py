"""Throughput of preparation and of reading, on a fake food101-layout folder.

    python -m delo_dist.data.throughput --samples 300

Makes <samples> photo-like JPEGs (smooth colour fields with fine grain, as large as real
512x384 photos, not flat colours that decode for free), times `prepare` (decode, resize to
--image-size, re-encode, write tars), then times reading every split of every session
through SessionStream + make_loader with the default backbone's `collate` (ViLT: JPEG
decode, tensors normalised for the model, tokenised text), the way the trainer reads. Images are
all present when read (no missing table): the most decoding work. Prints JSON and a table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from delo_dist.data.prepare import prepare
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream, make_loader

WORDS = "crispy golden baked fresh sweet spicy sauce plate with served homemade chicken " \
        "cheese tomato garlic butter cream chocolate rice noodles soup salad grilled".split()


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: a smooth colour field with fine grain (it costs a real photo's
    decoding time; flat colours would decode for free)."""
    coarse = rng.integers(0, 256, (max(height // 32, 1), max(width // 32, 1), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 30))))


def make_raw(root: Path, samples: int, classes: int, width: int, height: int, seed: int = 0) -> int:
    """A food101-layout folder: `classes` classes, samples split 80/5/15 train/val/test."""
    rng = np.random.default_rng(seed)
    names = [f"dish{c:02d}" for c in range(classes)]
    texts, splits = {}, {"train": [], "val": [], "test": []}
    raw_bytes = 0
    for i in range(samples):
        cls, n = names[i % classes], i // classes
        frac = (i * 0.6180339887) % 1.0  # spread splits over classes
        split = "train" if frac < 0.80 else "val" if frac < 0.85 else "test"
        name = f"{cls}_{n}.jpg"
        path = root / "images" / ("test" if split == "test" else "train") / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(rng, width, height).save(path, format="JPEG", quality=90)
        raw_bytes += path.stat().st_size
        texts[name] = sentence(rng)
        splits[split].append(name)
    (root / "text.json").write_text(json.dumps(texts))
    (root / "split.json").write_text(json.dumps(splits))
    (root / "class_idx.json").write_text(json.dumps({c: k for k, c in enumerate(names)}))
    return raw_bytes


def make_prepared(root: Path, samples: int, classes: int, width: int, height: int,
                  image_size: int, sessions: int, workers: int = 0, seed: int = 0) -> dict:
    """The set-up this command and the benchmark's loader rows share: a raw food101-layout
    folder `root/raw` prepared into shards `root/shards` (timed)."""
    raw, shards = Path(root) / "raw", Path(root) / "shards"
    raw_bytes = make_raw(raw, samples, classes, width, height, seed=seed)
    t0 = time.perf_counter()
    summary = prepare("food101", raw, shards, image_size=image_size, workers=workers,
                      sessions=sessions, classes_per_session=classes // sessions, progress=False)
    return {"raw": raw, "shards": shards, "raw_bytes": raw_bytes,
            "seconds": time.perf_counter() - t0,
            "prepared": sum(sum(c.values()) for c in summary["counts"])}


def reading_backbone(image_size: int, max_text_len: int):
    """The default recipe's backbone as the trainer reads with it: its `collate` decodes,
    normalises and tokenises."""
    from delo_dist.config import load_recipe
    from delo_dist.models.adapters import RoutingContext
    from delo_dist.models.backbone import build_backbone
    recipe = load_recipe(None, ["data.make_synthetic=true", f"backbone.image_size={image_size}",
                                f"backbone.max_text_len={max_text_len}"])
    return build_backbone(recipe.backbone, RoutingContext())


def read_all(shards: Path, collate, batch_size: int, workers: int) -> tuple[int, float]:
    m = read_manifest(shards)
    n, t0 = 0, time.perf_counter()
    for k in range(len(m["sessions"])):
        for split in ("train", "val", "test"):
            stream = SessionStream(shards, m, k, split, batch_size, collate, {},
                                   train=split == "train")
            for batch in make_loader(stream, workers):
                assert batch["pixel_values"].dtype == torch.float32
                n += len(batch["keys"])
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--max-text-len", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prepare-workers", type=int, default=0, help="0: one process")
    p.add_argument("--read-workers", type=int, default=0, help="DataLoader workers (0: one process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        made = make_prepared(Path(tmp), a.samples, a.classes, a.width, a.height, a.image_size,
                             sessions=2, workers=a.prepare_workers)
        raw_bytes, prep_s, prepared = made["raw_bytes"], made["seconds"], made["prepared"]
        shard_bytes = sum(f.stat().st_size for f in made["shards"].rglob("*.tar"))
        backbone = reading_backbone(a.image_size, a.max_text_len)
        read_n, read_s = read_all(made["shards"], backbone.collate, a.batch_size, a.read_workers)
    result = {
        "samples": a.samples, "raw_image": f"{a.width}x{a.height}", "image_size": a.image_size,
        "raw_kb_per_image": raw_bytes / a.samples / 1024,
        "prepare": {"samples": prepared, "seconds": prep_s, "samples_per_s": prepared / prep_s,
                    "workers": a.prepare_workers, "shard_kb_per_sample": shard_bytes / prepared / 1024},
        "read": {"samples": read_n, "seconds": read_s, "samples_per_s": read_n / read_s,
                 "workers": a.read_workers, "batch_size": a.batch_size, "torch_threads": a.threads},
    }
    print(json.dumps(result, indent=1))
    print(f"\n{'stage':<10} {'samples':>8} {'seconds':>8} {'samples/s':>10}")
    for stage in ("prepare", "read"):
        r = result[stage]
        print(f"{stage:<10} {r['samples']:>8} {r['seconds']:>8.2f} {r['samples_per_s']:>10.1f}")
    return result


if __name__ == "__main__":
    main()
