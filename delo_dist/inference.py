"""Use a trained model: `delo_dist.load(folder)` -> `InferenceModel`, whose `predict` classifies
new image-text pairs, either modality possibly missing.

The folder is a training checkpoint, a run folder (its newest checkpoint) or an export
(`python -m delo_dist.export`): delo_dist/model_folder.py says what each holds. A pretrained
backbone (`backbone.pretrained`) is loaded from the hub or its local folder as in training
(`backbone=` names another copy); a tiny random one travels in the weights.

Prediction runs the evaluation's own path: samples are collated by the backbone's `collate`
(the dummy text and image are exactly training's), and `ContinualModel.predict` routes each
sample to a session and applies that session's adapters and head (a shared-head method, the
prompt methods: its prompted pass and one head over every seen class), under the training's
precision (`train.mixed_precision`; `auto`: what the run recorded, else the launch's
ACCELERATE_MIXED_PRECISION, else fp32), on the GPU when there is one.

Per sample, `predict` returns a dict:
    availability        "complete", "text_only" or "image_only"
    session             the session whose adapters and head were used (a shared-head method:
                        the session whose parts it chose, DualPrompt's E-prompt, or None
                        where it chooses none; oracle mode: the session given)
    session_confidence  how strongly the task identifier preferred that session (below);
                        None in oracle mode (the session was given) and where no identifier
                        chose it
    session_scores      the identifier's raw score of every seen session (None: oracle mode,
                        or a source that exposes no scores)
    classes, class_ids  the predicted class name(s) and global id(s): one for single-label
                        data; for multi-label, every class whose sigmoid is above 0.5 (the
                        threshold evaluation uses), possibly none
    scores              probabilities of those classes: single-label, the softmax over the
                        chosen session's classes (a head scores only its own session's
                        classes; a shared head: over every seen class, in oracle mode over
                        the given session's); multi-label, each class's sigmoid
    truncated           the text had more tokens than the trained length (`max_text_len`)
                        and was cut, as in training
or, for a sample that cannot be used (an unreadable image, both modalities missing),
{"error": reason} in its place, the others going on.

Identifier confidence, per source (`task_id.source`):
  - `analytic`: the ridge regresses the one-hot session, so its outputs estimate each
    session's probability (a linear probability model); the confidence is the chosen
    session's output after clipping the outputs at 0 and normalising them to sum 1.
  - cosine sources (`paper`, `first_layer`, `frozen_pooled`: cosine to the session keys;
    `class_prototypes`: best cosine to a prototype of the session's classes): a softmax over
    the cosine scores (temperature 1). Cosines lie in [-1, 1], so this is a relative score,
    not a calibrated probability: 1 / seen sessions means no preference.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from delo_dist.model_folder import (CheckpointError, ModelInfo, load_weights, read_recipe,
                                    resolve_folder)

from delo_dist.models.task_id import AVAILABILITY

__all__ = ["CheckpointError", "InferenceModel", "load"]


def resolve_device_precision(recipe, recorded: str | None, device=None,
                             precision: str | None = None) -> tuple[torch.device, str]:
    """The GPU if there is one; precision as training resolved it (see the module doc)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    value = precision or recipe.train.mixed_precision
    if value == "auto":
        value = recorded or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if value not in ("no", "bf16", "fp16"):
        raise ValueError(f"precision: {value!r}, expected no, bf16 or fp16")
    if value == "fp16" and device.type != "cuda":
        print("note: trained in fp16 (GPU only); predicting in fp32 on this CPU", file=sys.stderr)
        value = "no"
    return device, value


def load(path: str | Path, *, device: str | None = None, precision: str | None = None,
         backbone: str | None = None, shards: str | Path | None = None,
         batch_size: int | None = None) -> "InferenceModel":
    """An `InferenceModel` from a training checkpoint, a run folder or an export.

    device: "cuda", "cpu", ... (default: the GPU if there is one); precision: "no", "bf16",
    "fp16" (default: as in training); backbone: a local copy of the pretrained backbone;
    shards: where the run's manifest is, if not at the recipe's data.shards (checkpoints
    only); batch_size: samples per forward (default: the recipe's eval.batch_size)."""
    from delo_dist.models.continual import ContinualModel
    info = resolve_folder(path, shards)
    recipe = read_recipe(info, backbone)
    if info.seen < 1:
        raise CheckpointError(f"{info.source}: no finished session yet (state.json session 0): "
                              "nothing to predict with")
    torch.manual_seed(recipe.seed)   # as the trainer builds it (a tiny backbone is then loaded)
    model = ContinualModel(recipe, info.session_classes, info.num_classes, info.multilabel)
    load_weights(info, model, include_backbone=not recipe.backbone.pretrained)
    dev, prec = resolve_device_precision(recipe, info.precision, device, precision)
    return InferenceModel(model.to(dev), recipe, info, dev, prec,
                          batch_size or recipe.eval.batch_size)


# ------------------------------------------------------------------ identifier confidence

def identifier_scores(identifier, feats: dict, flags: dict, seen: int):
    """(B, seen) scores whose argmax is the routed session, and their confidence (each
    identifier says what its scores mean: `TaskIdentifier.scores` and `confidence`)."""
    s = identifier.scores(feats, flags, seen)
    return s, identifier.confidence(s)


# ------------------------------------------------------------------ the model

@dataclass
class Prepared:
    """One input pair made ready for the collate, or the reason it cannot be used."""
    sample: dict | None
    error: str | None = None
    truncated: bool = False


class InferenceModel:
    def __init__(self, model, recipe, info: ModelInfo, device, precision: str, batch_size: int):
        self.model, self.recipe, self.info = model.eval(), recipe, info
        self.device, self.precision, self.batch_size = device, precision, batch_size
        self.class_names = info.class_names
        self.seen = info.seen
        self.multilabel = info.multilabel
        # global class id -> position in its session's head, per session
        self._local = [{c: i for i, c in enumerate(cls)} for cls in info.session_classes]
        # a shared head's columns: every seen session's classes in order (seen is fixed)
        self._column = {c: i for i, c in enumerate(c for k in range(self.seen)
                                                   for c in info.session_classes[k])}

    def __repr__(self) -> str:
        r = self.recipe
        backbone = r.backbone.pretrained or r.backbone.name + "-tiny"
        return (f"InferenceModel({r.method.name} on {backbone}, {self.seen} sessions, "
                f"{len(self.class_names)} classes, {self.info.kind} "
                f"{self.info.source}, {self.device}, precision {self.precision})")

    # -------------------------------------------------------------- inputs
    def prepare(self, image=None, text=None, key: str = "0") -> Prepared:
        """One pair -> the dict the backbone's collate reads. image: a path, a PIL image,
        encoded bytes or None; text: a string or None (blank counts as missing)."""
        text = None if text is None or not str(text).strip() else str(text)
        jpg = None
        if image is not None:
            try:
                jpg = _image_bytes(image)
            except (OSError, ValueError, TypeError) as e:
                return Prepared(None, f"image {image}: cannot be read ({e})")
        if jpg is None and text is None:
            return Prepared(None, "both modalities missing (no image and no text)")
        status = 0 if jpg is not None and text is not None else (1 if text is None else 2)
        return Prepared({"key": key, "jpg": jpg, "txt": text or "", "label": 0, "session": 0,
                         "status": status}, truncated=text is not None and self.truncates(text))

    def truncates(self, text: str) -> bool:
        """Whether the collate cuts this text (more tokens than the trained max_text_len)."""
        bb = self.model.backbone
        return len(bb.tokenizer(text, truncation=False)["input_ids"]) > bb.max_text_len

    def collate(self, samples: list[dict]) -> tuple[dict | None, dict[int, str]]:
        """The backbone's collate over the samples; one that fails alone (an image that does
        not decode) is left out and its error returned by position."""
        collate = self.model.backbone.collate
        try:
            return collate(samples), {}
        except Exception:  # noqa: BLE001 - find which sample(s), below
            pass
        good, errors = [], {}
        for i, s in enumerate(samples):
            try:
                collate([s])
                good.append(s)
            except Exception as e:  # noqa: BLE001 - whatever the decoder raises
                errors[i] = f"image cannot be decoded ({type(e).__name__}: {e})"
        return (collate(good) if good else None), errors

    # -------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_batch(self, batch: dict, mode: str = "task_agnostic",
                      session: int | None = None) -> list[dict]:
        """A collated batch -> one result per row (see the module doc). mode "oracle": every
        row uses `session`, or, when None, the batch's true sessions (prepared shards)."""
        from delo_dist.models.task_id import availability
        from delo_dist.training.engines import autocast
        from delo_dist.training.evaluation import to_device
        batch = to_device(batch, self.device)
        self.model.last_identification = self.model.last_head_logits = None
        shared = self.model.method.head == "shared"
        n = len(batch["missing_text"])
        with autocast(self.precision, self.device):
            if mode == "oracle":
                sessions = (batch["session"] if session is None else
                            torch.full((n,), session, dtype=torch.long)).to(self.device)
                if shared:   # the method's own oracle: the given session's parts and classes
                    out = self.model.predict({**batch, "session": sessions}, self.seen)
                    pred, logits = out["oracle_pred"], out["oracle_logits"]
                else:
                    pred = self.model.predict_with(batch, sessions)
                routed = sessions
            elif mode == "task_agnostic":
                out = self.model.predict(batch, self.seen, oracle=False)
                pred, routed, logits = out["pred"], out.get("routed"), out.get("logits")
            else:
                raise ValueError(f"mode: {mode!r}, expected 'task_agnostic' or 'oracle'")
        scores = conf = None
        read = self.model.last_identification   # what the identifier routed from, if it did
        if mode == "task_agnostic" and read is not None and routed is not None:
            feats, flags, seen, scores = read     # scores: those the route took, if it took any
            if scores is None:                    # an identifier with its own route
                scores, conf = identifier_scores(self.model.identifier, feats, flags, seen)
            else:
                conf = self.model.identifier.confidence(scores)
            scores, conf = scores.cpu().tolist(), conf.cpu().tolist()
        if shared:   # columns: the seen sessions' classes in order (self._column)
            probs = (logits.float().sigmoid() if self.multilabel else logits.float().softmax(-1)).cpu().tolist()
        else:
            probs = self._row_probs(self.model.last_head_logits, n)
        sessions = [None] * n if routed is None else routed.cpu().tolist()
        pred = pred.cpu()
        ids = ([r.nonzero().squeeze(1).tolist() for r in pred] if self.multilabel
               else [[c] for c in pred.tolist()])
        results = []
        for j, (a, k) in enumerate(zip(availability(batch).tolist(), sessions)):
            local = self._column if shared else None if probs is None else self._local[k]
            results.append({
                "availability": AVAILABILITY[a], "session": k,
                "session_confidence": None if conf is None else conf[j][k],
                "session_scores": None if scores is None else scores[j],
                "classes": [self.class_names[c] for c in ids[j]], "class_ids": ids[j],
                "scores": None if probs is None else [probs[j][local[c]] for c in ids[j]]})
        return results

    def _row_probs(self, heads: dict | None, n: int) -> list | None:
        """Per row, the probabilities of its session's classes (softmax, or sigmoid when
        multi-label, of its head's logits), from the head calls of
        ContinualModel.predict_with (`last_head_logits`: session k -> the rows it scored and
        their logits); None if they do not cover the batch's rows (e.g. a method without
        per-session routing, which calls no predict_with)."""
        if not heads:
            return None
        rows = [None] * n
        for idx, out in heads.values():
            idx = idx.tolist()
            if len(idx) != len(out) or any(j >= n for j in idx):
                return None
            out = out.float()
            probs = out.sigmoid() if self.multilabel else out.softmax(-1)
            for j, p in zip(idx, probs.cpu().tolist()):
                rows[j] = p
        return None if any(r is None for r in rows) else rows

    def predict_iter(self, pairs: Iterable[tuple], mode: str = "task_agnostic",
                     session: int | None = None) -> Iterator[dict]:
        """(image, text) pairs -> results in order, `batch_size` pairs per forward."""
        self.check_mode(mode, session)
        chunk: list[Prepared] = []
        for i, (image, text) in enumerate(pairs):
            chunk.append(self.prepare(image, text, key=str(i)))
            if len(chunk) == self.batch_size:
                yield from self._run(chunk, mode, session)
                chunk = []
        if chunk:
            yield from self._run(chunk, mode, session)

    def predict(self, images=None, texts=None, *, mode: str = "task_agnostic",
                session: int | None = None) -> list[dict]:
        """Classify pairs: images (paths, PIL images, bytes or None) and texts (strings or
        None), of equal length, or one of them None (that modality missing throughout).
        mode "oracle" with session=k: every sample uses session k (task-incremental use)."""
        images, texts = _pairs(images, texts)
        return list(self.predict_iter(zip(images, texts), mode, session))

    def check_mode(self, mode: str, session: int | None) -> None:
        if mode == "oracle" and (session is None or not 0 <= session < self.seen):
            raise ValueError(f"mode='oracle' needs session=k with 0 <= k < {self.seen} "
                             f"(the sessions this model has finished), got {session!r}")
        if mode == "task_agnostic" and session is not None:
            raise ValueError("session= is for mode='oracle'; task-agnostic prediction routes "
                             "each sample itself")

    def _run(self, chunk: list[Prepared], mode: str, session: int | None) -> list[dict]:
        usable = [i for i, p in enumerate(chunk) if p.sample is not None]
        batch, bad = self.collate([chunk[i].sample for i in usable]) if usable else (None, {})
        errors = {i: p.error for i, p in enumerate(chunk) if p.error}
        errors.update({usable[pos]: why for pos, why in bad.items()})
        done = iter(self.predict_batch(batch, mode, session) if batch is not None else [])
        return [{"error": errors[i]} if i in errors else {**next(done), "truncated": p.truncated}
                for i, p in enumerate(chunk)]


def _pairs(images, texts) -> tuple[list, list]:
    if images is None and texts is None:
        raise ValueError("predict: give images=, texts= or both")
    def listed(x):   # one item (a path, bytes, a PIL image, a text) or a sequence of them
        single = isinstance(x, (str, bytes, Path)) or hasattr(x, "getpixel")
        return None if x is None else [x] if single else list(x)
    images, texts = listed(images), listed(texts)
    images = images if images is not None else [None] * len(texts)
    texts = texts if texts is not None else [None] * len(images)
    if len(images) != len(texts):
        raise ValueError(f"predict: {len(images)} images and {len(texts)} texts; give one of "
                         "each per sample (None where a modality is missing)")
    return images, texts


def _image_bytes(image) -> bytes:
    """Encoded image bytes the collate decodes: a file's own bytes (a JPEG decodes exactly
    as in training), a PIL image losslessly as BMP (no JPEG re-compression)."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="BMP")
        return buf.getvalue()
    else:
        raise TypeError(f"expected a path, a PIL image or bytes, got {type(image).__name__}")
    with Image.open(io.BytesIO(data)) as img:   # the header parses: an image at all?
        img.size
    return data
