"""Loader rows: samples/s on one core (one process, one torch thread) over the same photo-like
512x384 JPEGs, prepared as delo_dist/data/throughput.py prepares them.
  loader/<backbone>            prepared shards through SessionStream + the backbone's collate:
                               the trainer's path
  loader/<backbone>_reference  the backbone's reference pipeline (its bench entry's
                               `loader_reference`), when it names one
Reference pipelines live here, re-implemented for this measurement only.
"""
from __future__ import annotations

import json
from pathlib import Path

from delo_dist.bench.harness import Row
from delo_dist.bench.rows import resolve
from delo_dist.data.throughput import make_prepared, read_all

RAW_WIDTH, RAW_HEIGHT, CLASSES = 512, 384, 4


def loader_rows(name: str, backbone, reference: str | None, samples: int, batch: int,
                folder: Path, seed: int) -> tuple[list[Row], dict]:
    made = make_prepared(folder, samples, CLASSES, RAW_WIDTH, RAW_HEIGHT, backbone.image_size,
                         sessions=1, seed=seed)
    n = made["prepared"]

    def ours() -> int:
        return read_all(made["shards"], backbone.collate, batch, workers=0)[0]
    rows = [Row(f"loader/{name}", ours, n, threads=1, autocast=False)]
    if reference:
        rows.append(Row(f"loader/{name}_reference", resolve(reference)(made["raw"], backbone, batch),
                        n, threads=1, autocast=False))
    info = {"samples": n, "raw_image": f"{RAW_WIDTH}x{RAW_HEIGHT}",
            "image_size": backbone.image_size, "batch": batch, "torch_threads": 1}
    return rows, info


def vilt_processor(raw: Path, backbone, batch: int):
    """ViLT's official pipeline: PIL open, resize, then ViltProcessor on each batch (image
    processor and tokenizer), over every image of the raw folder."""
    from PIL import Image
    from transformers import ViltProcessor
    try:  # transformers >= 5 without torchvision: the PIL backend, named as such
        from transformers import ViltImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import ViltImageProcessor as ImageProcessor
    size = backbone.image_size
    texts = json.loads((raw / "text.json").read_text())
    files = sorted((raw / "images").rglob("*.jpg"))
    processor = ViltProcessor(image_processor=ImageProcessor(size={"shortest_edge": size}),
                              tokenizer=backbone.tokenizer)

    def call() -> int:
        for i in range(0, len(files), batch):
            chunk = files[i:i + batch]
            images = [Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
                      for f in chunk]
            processor(images=images, text=[texts[f.name] for f in chunk], padding="max_length",
                      truncation=True, max_length=backbone.max_text_len, return_tensors="pt")
        return len(files)
    return call
