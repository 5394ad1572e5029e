"""Input helpers shared by the backbones' collate functions."""
from __future__ import annotations

import io

import torch
from PIL import Image


def decode_image(jpg: bytes, size: int) -> torch.Tensor:
    """JPEG bytes -> (3, size, size) float in [0, 1]; draft mode downscales cheaply on decode
    (shards are already resized at preparation time, so this is usually a no-op resize)."""
    img = Image.open(io.BytesIO(jpg))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(size, size, 3).permute(2, 0, 1).float() / 255.0


def labels_tensor(samples: list[dict]):
    """Single-label: (B,) long. Multi-label: lists of global ids, kept as lists."""
    if isinstance(samples[0]["label"], list):
        return [s["label"] for s in samples]
    return torch.tensor([s["label"] for s in samples])


def subset(batch: dict, idx: torch.Tensor) -> dict:
    """Rows idx of a collated batch (tensors indexed, lists picked)."""
    return {k: v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()] for k, v in batch.items()}


def concat_batches(batches: list[dict]) -> dict:
    """Collated batches as one (tensors concatenated, lists joined): the micro-batches of one
    optimizer step, or a batch and rows repeated after it."""
    if len(batches) == 1:
        return batches[0]
    return {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(v) else
            [x for b in batches for x in b[k]] for k, v in batches[0].items()}
