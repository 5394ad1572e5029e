"""A synthetic CMML benchmark with real JPEGs and real sentences, written as shards.

    python -m delo_dist.data.synthetic --out data/synthetic --sessions 4

Classes are split into sessions. Within a session, class j is the pair
(image code j % 2, text code j // 2): the text names one of C/2 flavours, and the image
code is carried by a cue that depends on the session (session s uses CUES[s % 3]:
brightness and shape, vertical position, or size). So image alone or text alone leaves
the class ambiguous and both together identify it: a model using both modalities beats
either alone, and a missing modality costs accuracy. Because sessions rely on different
cues, one adapter tuned session after session is pulled away from earlier sessions' cues:
interference, and so forgetting, is measurable. Each session has its own background hue
and topic word, so the session itself can be recognised from either modality (what the
task identification needs). 10 % of texts name a wrong flavour of the same session.
Deterministic for a seed.

    python -m delo_dist.data.synthetic --out data/synthetic_content --variant content

The `content` variant keeps the class structure (class j = image pattern j % 2 and text
flavour j // 2: each modality alone leaves the class ambiguous) but removes every
session-level cue: all sessions draw background and foreground colours, position, size,
filler words and a dish word from ONE distribution. Only content tells sessions apart: each
session has its own two image textures (PATTERNS) and its own flavour
words, as Food-101's classes split into sessions do. Sessions need different patterns, so
an adapter tuned session after session still interferes with earlier ones.

    python -m delo_dist.data.synthetic --out data/synthetic_shared --variant shared

The `shared` variant is the content variant with its content shared between sessions, as
real classes share their words and looks: each texture kind (SHARED_KINDS) and each flavour
word is used by two sessions, for different classes (session s: kinds s and s + 1, flavours
s and s + S/2), so one modality's content leaves two candidate sessions and only the pair
names one. Sessions also draw what they share in different proportions (SHARED_STYLE):
session s's texture period lies around its own (0.1 to 0.3 of the image, log-spaced, with
a log-normal jitter that makes neighbours overlap), 30 % of its dish words come from three
favourites (any dish otherwise), and its texts put the flavour before the dish 80 % of the
time (first half of the sessions) or 20 % (second half). So identifying a session takes
fine content (which texture, at which scale; which words, in which order), as on real data:
held-out real CMML data routes about 69 % with [q_v, q_t, pooled]; this benchmark about 67 %.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from delo_dist.data.shards import encode_jpeg, sample_key, write_manifest, write_split
from delo_dist.models.offline_vocab import WORD_LISTS

TOPICS = WORD_LISTS["topics"]      # the word lists live with the offline tokenizer's
FLAVOURS = WORD_LISTS["flavours"]  # vocabulary: one place for both
FILLERS = WORD_LISTS["fillers"]
CUES = {  # image cue of each session kind: (name of code 0, name of code 1)
    "brightness": ("dark-disc", "bright-square"),
    "position": ("top", "bottom"),
    "size": ("small", "large"),
}
CUE_ORDER = list(CUES)
VOCAB_WORDS = TOPICS + FLAVOURS + FILLERS
PATTERNS = ["h-fine", "h-coarse", "v-fine", "v-coarse", "d-fine", "d-coarse", "a-fine",
            "a-coarse", "checker-fine", "checker-coarse", "dots", "rings"]  # content: 2 a session
SHARED_KINDS = ["h", "v", "d", "a", "checker", "dots", "rings"]   # shared: each in two sessions
SHARED_STYLE = {                 # shared: what a session draws in its own proportions
    "period": (0.1, 0.3),        # mean texture period, session 0 .. S-1, fraction of the image
    "jitter": 0.3,               # log-normal spread of a sample's period around its session's
    "favourite_dishes": 3,       # dish words a session favours ...
    "favourite_share": 0.3,      # ... drawn from them this often (else any of the 12)
    "order": 0.8,                # first half of the sessions: flavour before dish this often
}                                # (second half: dish first as often)
VARIANTS = ("cue", "content", "shared")


def _draw(rng: random.Random, session: int, n_sessions: int, code: int, size: int) -> Image.Image:
    import colorsys
    hue = session / max(n_sessions, 1)
    bg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.85))
    bg = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in bg)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cue = CUE_ORDER[session % len(CUE_ORDER)]
    dark, disc = rng.random() < 0.5, rng.random() < 0.5   # nuisance unless they are the cue
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if cue == "brightness":
        dark = disc = code == 0
    elif cue == "position":
        r = rng.uniform(0.15, 0.22) * size
        cx = rng.uniform(r, size - r)
        cy = rng.uniform(r, size / 2 - r) if code == 0 else rng.uniform(size / 2 + r, size - r)
    else:
        r = rng.uniform(0.1, 0.15) * size if code == 0 else rng.uniform(0.35, 0.45) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fg = tuple(rng.randint(0, 60) if dark else rng.randint(195, 255) for _ in range(3))
    box = [cx - r, cy - r, cx + r, cy + r]
    (draw.ellipse if disc else draw.rectangle)(box, fill=fg)
    for _ in range(size // 4):  # speckle noise so images are not trivially identical
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def _draw_pattern(rng: random.Random, pattern: str, size: int,
                  period: float | None = None) -> Image.Image:
    """Content variant: the whole image is one texture (PATTERNS: stripes of 4 orientations
    at 2 periods, checkers, dots, rings), with random phase, period jitter and pixel noise.
    Colours: a light and a dark colour of random hues in random polarity, from the same
    distribution for every pattern: the mean colour does not depend on the pattern (or
    session). Textures rather than objects: a frozen random backbone can tell them apart.
    `period` (pixels; shared variant): the scale of any kind, instead of its fineness."""
    import numpy as np
    light = np.array([rng.randint(155, 255) for _ in range(3)], float)
    dark = np.array([rng.randint(0, 100) for _ in range(3)], float)
    if rng.random() < 0.5:
        light, dark = dark, light
    kind, _, fineness = pattern.partition("-")
    scaled = period is not None
    if not scaled:
        period = size * (0.125 if fineness == "fine" else 0.25) * rng.uniform(0.9, 1.1)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    x, y = x + rng.uniform(0, period), y + rng.uniform(0, period)   # random phase
    half = period / 2
    if kind == "h":
        on = y % period < half
    elif kind == "v":
        on = x % period < half
    elif kind == "d":
        on = (x + y) / math.sqrt(2) % period < half
    elif kind == "a":
        on = (x - y) / math.sqrt(2) % period < half
    elif kind == "checker":
        on = (x % period < half) ^ (y % period < half)
    elif kind == "dots":
        p = period if scaled else size * 0.2
        on = (x % p - p / 2) ** 2 + (y % p - p / 2) ** 2 < (p / 4) ** 2
    elif kind == "rings":
        cx, cy = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        p = period if scaled else size * 0.2
        on = np.hypot(x - cx, y - cy) % p < p / 2
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    img = np.where(on[..., None], light, dark)
    noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 10, img.shape)
    return Image.fromarray((img + noise).clip(0, 255).astype(np.uint8))


def _content_text(rng: random.Random, flavour: str) -> str:
    """Content variant: the flavour (the class's content word) plus a dish word and fillers
    drawn from the distribution every session shares."""
    return _text(rng, rng.choice(TOPICS), flavour)


def _shared_layout(s: int, sessions: int, n_codes: int) -> dict:
    """Shared variant, session s: its 2 texture kinds (by image code), its flavour words (by
    text code), its favourite dishes, its mean texture period (fraction of the image) and
    how often its texts put the flavour before the dish. Kinds: s and s + 1; flavours:
    s + t * stride, modulo the number used (S or more): each kind and each flavour is used
    by two sessions, and with 4 sessions a (kind, flavour) pair by one only."""
    m_kinds, m_flav = max(sessions, 2), max(sessions, 2 * n_codes)
    stride = m_flav // n_codes
    n_fav, (lo, hi) = SHARED_STYLE["favourite_dishes"], SHARED_STYLE["period"]
    first = SHARED_STYLE["order"] if s < (sessions + 1) // 2 else 1 - SHARED_STYLE["order"]
    return {"kinds": [SHARED_KINDS[(s + i) % m_kinds] for i in range(2)],
            "flavours": [FLAVOURS[(s + t * stride) % m_flav] for t in range(n_codes)],
            "dishes": [TOPICS[(n_fav * s + i) % len(TOPICS)] for i in range(n_fav)],
            "period": lo * (hi / lo) ** (s / max(sessions - 1, 1)), "flavour_first": first}


def _shared_sample(rng: random.Random, kind: str, flavour: str, style: dict,
                   size: int) -> tuple[Image.Image, str]:
    """Shared variant: the class's texture kind at a period drawn around the session's; the
    class's flavour and a dish word (one of the session's favourites `favourite_share` of
    the time, else any), side by side in the session's preferred order, among fillers."""
    period = size * style["period"] * math.exp(rng.gauss(0.0, SHARED_STYLE["jitter"]))
    img = _draw_pattern(rng, kind, size, period=max(period, 3.0))
    share = SHARED_STYLE["favourite_share"]
    dish = rng.choice(style["dishes"]) if rng.random() < share else rng.choice(TOPICS)
    pair = [flavour, dish] if rng.random() < style["flavour_first"] else [dish, flavour]
    words = rng.sample(FILLERS, rng.randint(1, 3))
    at = rng.randint(0, len(words))
    return img, " ".join(words[:at] + pair + words[at:])


def _text(rng: random.Random, topic: str, flavour: str) -> str:
    words = [flavour, topic] + rng.sample(FILLERS, rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words)


def make_synthetic(out: str | Path, sessions: int = 4, classes_per_session: int = 4,
                   train_per_class: int = 48, val_per_class: int = 8, test_per_class: int = 24,
                   image_size: int = 64, samples_per_shard: int = 200, seed: int = 0,
                   progress: bool = True, variant: str = "cue") -> Path:
    settings = {k: v for k, v in locals().items() if k not in ("out", "progress")}
    out = Path(out)
    if synthetic_folder_ready(out, settings):
        return out
    n_codes = math.ceil(classes_per_session / 2)
    if variant not in VARIANTS:
        raise ValueError(f"synthetic: variant must be one of {VARIANTS}, got {variant!r}")
    if sessions > len(TOPICS) or sessions * n_codes > len(FLAVOURS):
        raise ValueError(f"synthetic: at most {len(TOPICS)} sessions and "
                         f"{len(FLAVOURS)} flavours in all (sessions x ceil(classes/2))")
    if variant == "content" and 2 * sessions > len(PATTERNS):
        raise ValueError(f"synthetic: the content variant has {len(PATTERNS)} patterns, "
                         f"2 per session: at most {len(PATTERNS) // 2} sessions")
    if variant == "shared" and (sessions > len(SHARED_KINDS) or classes_per_session > 4):
        raise ValueError(f"synthetic: the shared variant has {len(SHARED_KINDS)} texture kinds, "
                         f"one more a session: at most {len(SHARED_KINDS)} sessions, and at most "
                         "4 classes a session (2 kinds x 2 flavours)")
    per_split = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    total = sessions * classes_per_session * sum(per_split.values())
    bar = tqdm(total=total, desc="synthetic data", disable=not progress, unit="sample")
    manifest_sessions, class_names = [], []
    for s in range(sessions):
        flavours = FLAVOURS[s * n_codes:(s + 1) * n_codes]
        classes = list(range(s * classes_per_session, (s + 1) * classes_per_session))
        cue = CUES[CUE_ORDER[s % len(CUE_ORDER)]]
        patterns = PATTERNS[2 * s:2 * s + 2]
        if variant == "shared":
            style = _shared_layout(s, sessions, n_codes)
            patterns, flavours = style["kinds"], style["flavours"]
        class_names += [f"{patterns[j % 2]}-{flavours[j // 2]}" if variant != "cue" else
                        f"{cue[j % 2]}-{flavours[j // 2]}-{TOPICS[s]}"
                        for j in range(classes_per_session)]
        splits = {}
        for split, per_class in per_split.items():
            rng = random.Random(f"{seed}-{s}-{split}")

            def samples():
                items = [(j, i) for j in range(classes_per_session) for i in range(per_class)]
                rng.shuffle(items)  # classes interleaved inside shards
                for idx, (j, _) in enumerate(items):
                    flavour = flavours[j // 2]
                    if rng.random() < 0.1:
                        flavour = rng.choice(flavours)
                    if variant == "shared":
                        img, txt = _shared_sample(rng, patterns[j % 2], flavour, style, image_size)
                    elif variant == "content":
                        img = _draw_pattern(rng, patterns[j % 2], image_size)
                        txt = _content_text(rng, flavour)
                    else:
                        img = _draw(rng, s, sessions, j % 2, image_size)
                        txt = _text(rng, TOPICS[s], flavour)
                    bar.update(1)
                    yield {"key": sample_key(s, split, idx), "jpg": encode_jpeg(img),
                           "txt": txt, "label": classes[j]}

            splits[split] = write_split(samples(), out, s, split, samples_per_shard)
        manifest_sessions.append({"classes": classes, "splits": splits})
    bar.close()
    write_manifest(out, {
        "dataset": "synthetic", "multilabel": False,
        "num_classes": sessions * classes_per_session, "class_names": class_names,
        "image_size": image_size, "sessions": manifest_sessions,
        "source": {"generator": GENERATOR, "seed": seed, "variant": variant, "settings": settings},
    })
    return out


GENERATOR = "delo_dist.data.synthetic"


def make_from_config(root: Path, s) -> None:
    """The benchmark a recipe's data.synthetic section describes, made in `root`."""
    t0 = time.time()   # a foreign folder is refused inside, before a word is printed here
    make_synthetic(root, s.sessions, s.classes_per_session, s.train_per_class, s.val_per_class,
                   s.test_per_class, s.image_size, s.samples_per_shard, s.seed,
                   progress=sys.stderr.isatty(), variant=s.variant)
    print(f"data.shards={root} had no manifest.json: made the synthetic benchmark there "
          f"(data.make_synthetic=true, {time.time() - t0:.0f} s)", flush=True)


def synthetic_folder_ready(out: Path, settings: dict) -> bool:
    """True if `out` already holds this benchmark made with these settings; False if it is
    absent or empty (write it). Anything else is not ours to overwrite: an error."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    manifest = out / "manifest.json"
    source = {}
    if manifest.is_file():
        try:
            source = json.loads(manifest.read_text()).get("source", {})
        except ValueError:
            pass
    if source.get("generator") != GENERATOR:
        raise FileExistsError(f"{out}: not empty and not a synthetic benchmark made by this project: "
                              "refusing to write synthetic data into it (point data.shards / --out "
                              "at an absent or empty folder)")
    if source.get("settings") != settings:
        raise FileExistsError(f"{out}: holds a synthetic benchmark made with other settings "
                              f"({source.get('settings', 'not recorded')}, asked for {settings}): "
                              "use another folder, or delete this one to remake it")
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--classes-per-session", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=48)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--test-per-class", type=int, default=24)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=list(VARIANTS), default="cue",
                   help="cue: session-specific hue, topic and cue; content: only content differs; "
                        "shared: content shared between sessions in different proportions")
    a = p.parse_args(argv)
    try:
        out = make_synthetic(a.out, a.sessions, a.classes_per_session, a.train_per_class,
                             a.val_per_class, a.test_per_class, a.image_size,
                             a.samples_per_shard, a.seed, variant=a.variant)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}")
    print(f"{out}/manifest.json ready")


if __name__ == "__main__":
    main()
