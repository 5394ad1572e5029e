"""Task identification: which session's adapters and head a test sample uses, without its
session id. A plug-in chosen by `task_id.source`: a class here (or in a user's module) with
its name, its settings section `task_id.<source>.*` and `build`, registered by name
(delo_dist/plugins.py).

Every source reads only adapter-free features (`Backbone.identification_features`): no
later session can change what an earlier session's statistics were computed from.

  - `paper`: DeLo's Eq. 7/8 as written. One key per session, the EMA (momentum beta) of the
    global batch-mean query at each training step; test: argmax of cosine. The query is the
    first adapted layer's normalised input averaged over the whole sequence (all real
    tokens, a missing modality's dummy tokens included, as the paper does not mask them).
  - `first_layer`: the same EMA per modality (q_v, q_t keys); a sample scores sessions by
    the modalities it has (a dummy input is the same in every session and cannot vote).
  - `frozen_pooled`: the EMA of the adapter-free pooled feature, one key per session.
  - `class_prototypes`: per class and modality, the exact mean of the frozen query over the
    session's training samples that have that modality; a sample goes to the session of
    its nearest prototype (cosine, averaged over the modalities it has).
  - `analytic` (ours, in the spirit of RanPAC and analytic class-incremental learning): a
    ridge regressor from phi = [q_v, q_t, pooled, per-modality token means of the chosen
    layers (`task_id.analytic.layers`, read by hooks in the adapter-free pass that yields pooled:
    no extra forward), each block L2-normalised, a missing modality's blocks zeroed, then
    the one-hot availability] to the one-hot session (or class, `task_id.analytic.targets`). It
    keeps only G = sum phi phi^T and S_k = sum_{i in k} phi_i (float64), so the solution
    W = (G + lambda I)^-1 [S_0 .. S_k] is exact without storing a sample. lambda: the value of
    a log grid that minimises the squared error on the validation split, computed exactly
    from the same statistics of the val split (Gram, per-session sums, count). Its width
    is capped by `task_id.analytic.max_dims` (see AnalyticRouter).

EMA sources update at every training step (`observe`, from all-reduced sums). Statistics
sources fit at the end of each session (`fit`): one adapter-free pass over the session's
train split (and val split for `analytic`), accumulated per rank and all-reduced once, then
a solve on CPU in float64: every rank holds the same state. All state is buffers, so the
model checkpoint carries it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from delo_dist import dist
from delo_dist.plugins import Plugin

AVAILABILITY = ("complete", "text_only", "image_only")


def availability(batch: dict) -> torch.Tensor:
    """(B,) 0 complete, 1 text-only (image missing), 2 image-only (text missing)."""
    return batch["missing_image"].long() * 1 + batch["missing_text"].long() * 2


def present(batch: dict, device) -> torch.Tensor:
    """(B, 2) bool: has image, has text."""
    return torch.stack([~batch["missing_image"], ~batch["missing_text"]], 1).to(device)


class TaskIdentifier(Plugin, nn.Module):
    needs_pooled = False        # whether route/observe need the adapter-free pooled feature
    fits_per_session = False    # whether `fit` needs a pass over the session's data
    fit_only_buffers: tuple = ()   # buffers only `fit` reads (route never): exports drop them

    @classmethod
    def build(cls, settings, session_classes: list[list[int]], num_classes: int,
              backbone) -> "TaskIdentifier":
        """The identifier for these sessions on this backbone (widths: `backbone.query_dim`,
        the first-layer queries'; `backbone.hidden_size`, the pooled feature's)."""
        raise NotImplementedError

    def observe(self, feats: dict, batch: dict, session: int) -> None:
        """Every training step (a collective: every rank calls it)."""

    def fit(self, session: int, train: Iterable[dict], val: Iterable[dict],
            features: Callable[[dict], dict]) -> dict:
        """End of session (a collective). `train`/`val` yield this rank's batches."""
        return {}

    def scores(self, feats: dict, batch: dict, seen: int) -> torch.Tensor:
        """(B, seen): how well each sample matches each of the first `seen` sessions."""
        raise NotImplementedError

    def route(self, feats: dict, batch: dict, seen: int) -> torch.Tensor:
        """(B,) the session each sample goes to: the best-scoring one."""
        return self.scores(feats, batch, seen).argmax(1)

    @staticmethod
    def confidence(scores: torch.Tensor) -> torch.Tensor:
        """(B, seen) a distribution over sessions from `scores` (softmax: relative, not
        calibrated; a source whose scores estimate probabilities says so by overriding)."""
        return scores.float().softmax(-1)

    def state_bytes(self) -> int:
        """Bytes of the state a checkpoint carries (every persistent buffer)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def describe(self) -> str:
        """One line for the start of a run: what this source keeps."""
        return f"{type(self).__name__}, state {self.state_bytes() / 1e6:.2f} MB"

    def state_sha(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------ EMA keys (Eq. 7 / 8)

# Task-key memory (paper, Eq. 7 and 8): keys per session, no session id at inference.
#
# Each session keeps M keys, one per query modality (M = 2: visual, textual, when the query
# source gives one query per modality; M = 1 for a single pooled query). While session k
# trains, key_{k,m} <- beta * key_{k,m} + (1 - beta) * mean of q_m over the global batch's
# samples that have modality m. At inference a sample scores each session by the mean of
# cos(q_m, key_{k,m}) over the modalities it has, and takes the argmax over the sessions
# trained so far. A missing modality does not vote: its query would be a dummy input's, the
# same in every session (the cross-modal guide's principle: the available modality decides).
# Updates run under no_grad with in-place copies, from sums the trainer has all-reduced, so
# every rank holds the same keys. Keys start at zero: cosine ignores the EMA's start-up
# shrinkage.

class TaskKeyMemory(nn.Module):
    def __init__(self, n_sessions: int, dim: int, momentum: float = 0.99, modalities: int = 1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("keys", torch.zeros(n_sessions, modalities, dim))
        self.register_buffer("updates", torch.zeros(n_sessions, modalities, dtype=torch.long))

    @torch.no_grad()
    def update(self, session: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """sums (M, d): per-modality sums of queries over the global batch; counts (M,)."""
        for m in range(self.keys.shape[1]):
            if counts[m] > 0:
                mean = (sums[m] / counts[m]).to(self.keys.dtype)
                self.keys[session, m].mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
                self.updates[session, m] += 1

    @torch.no_grad()
    def key_scores(self, q: torch.Tensor, present: torch.Tensor, seen: int) -> torch.Tensor:
        """q (B, M, d), present (B, M) bool -> (B, seen) mean cosine over present modalities."""
        sims = F.cosine_similarity(q.unsqueeze(1).float(), self.keys[:seen].unsqueeze(0), dim=-1)
        weight = present.unsqueeze(1).float()                          # (B, 1, M)
        return (sims * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)  # (B, seen)

    @torch.no_grad()
    def select(self, q: torch.Tensor, present: torch.Tensor, seen: int) -> torch.Tensor:
        """q (B, M, d), present (B, M) bool -> (B,) session ids among the first `seen`."""
        return self.key_scores(q, present, seen).argmax(dim=1)


@dataclass
class EmaSettings:
    """task_id.<paper | first_layer | frozen_pooled>.*"""
    momentum: float = 0.99                  # beta of Eq. 7

    def validate(self, check) -> None:
        check(0.0 <= self.momentum < 1.0, "momentum", "a float in [0, 1)", self.momentum)


class EmaKeys(TaskKeyMemory, TaskIdentifier):
    """Keys tracked by EMA of the global batch-mean query (one query or one per modality);
    buffers `keys` (sessions, M, d) and `updates` as in TaskKeyMemory."""
    per_modality = False
    Settings = EmaSettings

    @classmethod
    def build(cls, settings, session_classes, num_classes, backbone):
        dim = backbone.hidden_size if cls.needs_pooled else backbone.query_dim
        return cls(len(session_classes), dim, settings.momentum)

    def __init__(self, n_sessions: int, dim: int, momentum: float):
        super().__init__(n_sessions, dim, momentum, 2 if self.per_modality else 1)

    def query(self, feats: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, d) queries and (B, M) bool: which are real."""
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, feats, batch, session):
        q, real = self.query(feats, batch)
        w = real.unsqueeze(-1).to(q.dtype)
        packed = torch.cat([(q * w).sum(0), w.sum(0)], dim=-1).float()   # (M, d + 1)
        packed = dist.all_reduce_sum(packed)
        self.update(session, packed[:, :-1], packed[:, -1])

    @torch.no_grad()
    def scores(self, feats, batch, seen):
        return self.key_scores(*self.query(feats, batch), seen)


class PaperKeys(EmaKeys):
    name = "paper"

    def query(self, feats, batch):
        q = feats["q_all"]
        return q[:, None], torch.ones(len(q), 1, dtype=torch.bool, device=q.device)


class FirstLayerKeys(EmaKeys):
    name = "first_layer"
    per_modality = True

    def query(self, feats, batch):
        return torch.stack([feats["q_v"], feats["q_t"]], 1), present(batch, feats["q_v"].device)


class PooledKeys(EmaKeys):
    name = "frozen_pooled"
    needs_pooled = True

    def query(self, feats, batch):
        q = feats["pooled"]
        return q[:, None], torch.ones(len(q), 1, dtype=torch.bool, device=q.device)


# ------------------------------------------------------------------ class prototypes

def label_weights(labels, num_classes: int, device) -> torch.Tensor:
    """(B, C) float64: one-hot (single-label) or multi-hot (lists of class ids)."""
    if torch.is_tensor(labels):
        return F.one_hot(labels.to(device), num_classes).double()
    hot = torch.zeros(len(labels), num_classes, dtype=torch.float64, device=device)
    for i, ids in enumerate(labels):
        hot[i, list(ids)] = 1.0
    return hot


class ClassPrototypes(TaskIdentifier):
    name = "class_prototypes"
    fits_per_session = True

    @classmethod
    def build(cls, settings, session_classes, num_classes, backbone):
        return cls(session_classes, num_classes, backbone.query_dim)

    def __init__(self, session_classes: list[list[int]], num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        owner = torch.full((num_classes,), -1, dtype=torch.long)
        for k, classes in enumerate(session_classes):
            owner[torch.tensor(classes)] = k
        self.register_buffer("class_session", owner, persistent=False)
        self.register_buffer("sums", torch.zeros(num_classes, 2, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, 2, dtype=torch.float64))

    @torch.no_grad()
    def fit(self, session, train, val, features):
        sums, counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        for batch in train:
            feats = features(batch)
            hot = label_weights(batch["labels"], self.num_classes, sums.device)
            has = present(batch, sums.device).double()                          # (B, 2)
            for m, q in enumerate((feats["q_v"], feats["q_t"])):
                w = hot * has[:, m:m + 1]                                       # (B, C)
                sums[:, m] += w.T @ q.double()
                counts[:, m] += w.sum(0)
        own = self.class_session == session    # only this session's classes: earlier ones stay
        self.sums[own] = dist.all_reduce_sum(sums)[own]
        self.counts[own] = dist.all_reduce_sum(counts)[own]
        return {}

    @torch.no_grad()
    def scores(self, feats, batch, seen):
        """A session's score: its best prototype's (the nearest prototype decides)."""
        cand = ((self.class_session >= 0) & (self.class_session < seen)).nonzero().squeeze(1)
        protos = self.sums[cand] / self.counts[cand].clamp(min=1).unsqueeze(-1)   # (C', 2, d)
        q = torch.stack([feats["q_v"], feats["q_t"]], 1).double()                 # (B, 2, d)
        sims = F.cosine_similarity(q[:, None], protos[None], dim=-1)              # (B, C', 2)
        w = present(batch, q.device)[:, None, :].double() * (self.counts[cand] > 0)[None].double()
        score = (sims * w).sum(-1) / w.sum(-1).clamp(min=1)
        score = score.masked_fill(w.sum(-1) == 0, -2.0)     # a prototype it cannot compare to
        return _best_per_session(score, self.class_session[cand], seen)


def _best_per_session(scores: torch.Tensor, owner: torch.Tensor, seen: int) -> torch.Tensor:
    """(B, R) scores of rows (classes) owned by sessions -> (B, seen): each session's best row
    (a session without a row scores -inf); its argmax is the best row's session."""
    out = scores.new_full((scores.shape[0], seen), float("-inf"))
    return out.scatter_reduce(1, owner.long().expand_as(scores), scores, "amax")


# ------------------------------------------------------------------ analytic (ridge) router

RIDGE_GRID = [10.0 ** e for e in torch.arange(-6.0, 3.01, 0.5).tolist()]  # x mean diag(G)
LAYOUT_VERSION = 2   # 1: [q_v, q_t, pooled, availability] -> session (no `layout` buffer)


def ridge_features(feats: dict, batch: dict, layer_modalities: Iterable[str] = ()) -> torch.Tensor:
    """phi (B, raw + 3) float64: [q_v, q_t, pooled, layer means...] each L2-normalised, a
    missing modality's blocks zeroed, then the one-hot availability (it also plays the
    intercept). `layer_modalities`: the modality of each entry of feats["layers"]."""
    has = present(batch, feats["q_v"].device).double()
    col = {"image": has[:, :1], "text": has[:, 1:]}
    parts = [F.normalize(feats["q_v"].double(), dim=-1) * col["image"],
             F.normalize(feats["q_t"].double(), dim=-1) * col["text"],
             F.normalize(feats["pooled"].double(), dim=-1)]
    layer_modalities = list(layer_modalities)
    means = feats.get("layers", []) if layer_modalities else []
    if len(means) != len(layer_modalities):
        raise ValueError(f"analytic: {len(means)} layer means for {len(layer_modalities)} blocks")
    parts += [F.normalize(m.double(), dim=-1) * col[mod] for m, mod in zip(means, layer_modalities)]
    parts.append(F.one_hot(availability(batch).to(has.device), 3).double())
    return torch.cat(parts, 1)


def upper_mask(D: int, device=None) -> torch.Tensor:
    """(D, D) bool: the upper triangle with the diagonal, row by row (the packed order)."""
    return torch.ones(D, D, dtype=torch.bool, device=device).triu()


def pack(full: torch.Tensor) -> torch.Tensor:
    """A symmetric (D, D) matrix -> its upper triangle, D (D + 1) / 2 values."""
    return full[upper_mask(len(full), full.device)]


def unpack(packed: torch.Tensor, D: int) -> torch.Tensor:
    full = packed.new_zeros(D, D)
    full[upper_mask(D, packed.device)] = packed
    return full + full.triu(1).T


def trim_layers(sites: list, base: int, max_dims: int | None) -> list:
    """`task_id.analytic.reduce=layers`: keep whole layers, the latest first (counted from the end
    of each encoder), while base + their widths + 3 stays within max_dims; in the
    backbone's order. The measured choice: on the shared benchmark the last layer's means
    kept exactly routed better than all layers hashed to a similar width (BENCHMARKS.md)."""
    if max_dims is None:
        return list(sites)
    order = sorted(range(len(sites)), key=lambda i: (sites[i].num_layers - 1 - sites[i].index, i))
    kept, width = set(), base + 3
    for i in order:
        w = sum(b for _, b in sites[i].blocks)
        if width + w > max_dims:
            break
        kept.add(i)
        width += w
    return [site for i, site in enumerate(sites) if i in kept]


@dataclass
class AnalyticSettings:
    """task_id.analytic.*"""
    # encoder layers whose per-modality token means join [q_v, q_t, pooled], read in the
    # adapter-free pass that yields pooled: all, last, none, or a list of layer indices
    layers: Union[Literal["all", "last", "none"], list] = "all"
    # cap on the ridge's input width D (state ~ 8 D^2 bytes: two packed float64 Grams); null:
    # none. 4096: at ViLT-B/32's shape the last layer's means fit exactly (D = 3843, state
    # 119 MB). reduce: over the cap, drop the earliest layers first (layers) or hash every
    # feature to max_dims (sketch: a count sketch drawn from projection_seed, kept in the
    # state); base features wider than the cap are hashed.
    max_dims: Optional[int] = 4096
    reduce: Literal["layers", "sketch"] = "layers"
    projection_seed: int = 0
    targets: Literal["session", "class"] = "session"   # ridge to sessions or to classes

    def validate(self, check) -> None:
        check(not isinstance(self.layers, list) or (len(self.layers) >= 1 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers)), "layers",
            "all, last, none or a non-empty list of layer indices (ints)", self.layers)
        check(self.max_dims is None or self.max_dims >= 16, "max_dims", "null or an int >= 16",
              self.max_dims)


class AnalyticRouter(TaskIdentifier):
    """Ridge regression from phi (ridge_features) to one-hot targets: the session (default)
    or the class (`targets="class"`: a sample goes to the session of its best seen class).

    State: the train and validation Gram matrices (symmetric: stored as their upper
    triangles, D (D + 1) / 2 float64 each), per-target feature sums, the weights.
    Width. The raw features at ViLT-B/32's shape are 3 x 768 + 12 layers x 2 modalities x
    768 = 20,739 dims with availability, whose Grams would take 3.4 GB. `max_dims` caps the
    width D; the builder first drops whole layers (`trim_layers`, reduce=layers) and what
    is still wider (reduce=sketch, or the base features alone) is hashed to max_dims - 3
    dims by a count sketch: coordinate i is added, with sign s_i, to bucket h_i; h and s
    are drawn once from `seed` by a generator of their own (the global RNG is untouched)
    and kept as buffers, so every rank and every resumed run holds the same map and a
    checkpoint carries it. A sketch keeps inner products in expectation, as a Gaussian
    projection does (both routed alike here), and costs D_raw integers where a dense
    projection at that shape would take 212 MB. `state_bytes()` gives the size."""
    name = "analytic"
    Settings = AnalyticSettings
    needs_pooled = True
    fits_per_session = True
    fit_only_buffers = ("gram", "sums", "val_gram", "val_sums", "val_counts")

    @classmethod
    def build(cls, settings, session_classes, num_classes, backbone):
        from delo_dist.models.backbone import select_layers
        d, dp = backbone.query_dim, backbone.hidden_size
        layers = list(backbone.identification_layers())
        chosen = select_layers(layers, settings.layers)
        if settings.reduce == "layers":
            chosen = trim_layers(chosen, 2 * d + dp, settings.max_dims)
        positions = [i for i, site in enumerate(layers) if any(site is c for c in chosen)]
        return cls(session_classes, num_classes, d, dp, chosen, positions, settings.max_dims,
                   settings.targets, settings.projection_seed)

    def __init__(self, session_classes: list[list[int]], num_classes: int, dim: int,
                 pooled_dim: int | None = None, layers: list = (), positions: list[int] = (),
                 max_dims: int | None = None, targets: str = "session", seed: int = 0):
        super().__init__()
        self.query_dims = (dim, pooled_dim or dim)
        self.session_classes, self.num_classes = session_classes, num_classes
        self._build(list(layers), list(positions), max_dims, targets, seed)

    def _build(self, layers, positions, max_dims, targets, seed) -> None:
        """(Re)create every buffer for a feature layout (see adopt_checkpoint)."""
        dim, pooled_dim = self.query_dims
        self.layers = layers     # backbone IdentificationLayer sites read in the pooled pass
        self.layer_modalities = [m for site in layers for m, _ in site.blocks]
        self.targets = targets
        raw = 2 * dim + pooled_dim + sum(w for site in layers for _, w in site.blocks)
        dev = self.weights.device if hasattr(self, "weights") else None
        if targets == "class":   # row c: class c, owned by its session
            owner = torch.full((self.num_classes,), -1, dtype=torch.long)
            for k, classes in enumerate(self.session_classes):
                owner[torch.tensor(classes, dtype=torch.long)] = k
        else:
            owner = torch.arange(len(self.session_classes))
        self.register_buffer("row_session", owner.to(dev), persistent=False)
        D = raw + 3
        self.register_buffer("sketch_bucket", None)
        self.register_buffer("sketch_sign", None)
        if max_dims is not None and D > max_dims:
            g = torch.Generator(device="cpu").manual_seed(seed)
            bucket = torch.randint(0, max_dims - 3, (raw,), generator=g, device="cpu")
            sign = torch.randint(0, 2, (raw,), generator=g, device="cpu").to(torch.int8) * 2 - 1
            self.register_buffer("sketch_bucket", bucket.to(dev))
            self.register_buffer("sketch_sign", sign.to(dev))
            D = max_dims
        self.raw, self.width, rows = raw, D, len(owner)
        # what the statistics were computed from: checked against a checkpoint before loading
        self.register_buffer("layout", torch.tensor([LAYOUT_VERSION, raw, D, rows, *positions],
                                                    device=dev))
        f64 = dict(dtype=torch.float64, device=dev)
        self.register_buffer("gram", torch.zeros(D * (D + 1) // 2, **f64))       # packed
        self.register_buffer("sums", torch.zeros(rows, D, **f64))
        self.register_buffer("val_gram", torch.zeros(D * (D + 1) // 2, **f64))   # packed
        self.register_buffer("val_sums", torch.zeros(rows, D, **f64))
        self.register_buffer("val_counts", torch.zeros(rows, **f64))  # sum of y^2 per target
        self.register_buffer("weights", torch.zeros(D, rows, **f64))
        self.register_buffer("ridge", torch.zeros((), **f64))

    def describe(self) -> str:
        D, where = self.width, {}
        for site in self.layers:
            where.setdefault(site.encoder, []).append(site.index)
        layers = "; ".join(f"{e} layers {ix}" for e, ix in where.items()) or "no layer"
        width = (f"{self.raw + 3:,} dims hashed to {D:,}" if self.sketch_bucket is not None
                 else f"{D:,} dims")
        return (f"analytic ridge on [q_v, q_t, pooled] + per-modality token means of {layers} "
                f"+ availability: {width}, {self.targets} targets; state "
                f"{self.state_bytes() / 1e6:.1f} MB")

    def features(self, feats: dict, batch: dict) -> torch.Tensor:
        """phi (B, D) float64: ridge_features, sketched to D when wider than max_dims."""
        phi = ridge_features(feats, batch, self.layer_modalities)
        if self.sketch_bucket is None:
            return phi
        raw, avail = phi[:, :-3], phi[:, -3:]
        out = phi.new_zeros(len(phi), self.width - 3)
        out.index_add_(1, self.sketch_bucket, raw * self.sketch_sign.to(raw.dtype))
        return torch.cat([out, avail], 1)

    def _targets(self, batch: dict, session: int, n: int, device) -> torch.Tensor:
        """(B, rows) float64 one-hot (or multi-hot) targets."""
        if self.targets == "class":
            return label_weights(batch["labels"], self.num_classes, device)
        y = torch.zeros(n, len(self.row_session), dtype=torch.float64, device=device)
        y[:, session] = 1.0
        return y

    def _stats(self, batches, features, session: int):
        D, rows, dev = self.width, len(self.row_session), self.weights.device
        gram = torch.zeros(D, D, dtype=torch.float64, device=dev)
        sums = torch.zeros(rows, D, dtype=torch.float64, device=dev)
        counts = torch.zeros(rows, dtype=torch.float64, device=dev)
        for batch in batches:
            phi = self.features(features(batch), batch)
            y = self._targets(batch, session, len(phi), dev)
            gram += phi.T @ phi
            sums += y.T @ phi
            counts += (y * y).sum(0)
        return dist.all_reduce_sum(pack(gram)), dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)

    @torch.no_grad()
    def fit(self, session, train, val, features):
        own = self.row_session == session     # this session's rows: earlier ones stay
        g, s, _ = self._stats(train, features, session)
        self.gram += g
        self.sums[own] = s[own]
        g, s, n = self._stats(val, features, session)
        self.val_gram += g
        self.val_sums[own] = s[own]
        self.val_counts[own] = n[own]
        lam, errors = self.solve(session + 1)
        return {"ridge_lambda": lam, "ridge_val_error": min(errors) if errors else float("nan")}

    def _seen_rows(self, seen: int) -> torch.Tensor:
        return ((self.row_session >= 0) & (self.row_session < seen)).nonzero().squeeze(1)

    def solve(self, seen: int) -> tuple[float, list[float]]:
        """W = (G + lambda I)^-1 S for the lambda of the grid with the least validation
        squared error ||Y - Phi W||^2 = n - 2 tr(W^T S_val) + tr(W^T G_val W), exact from the
        statistics (n = sum of ||y||^2). On CPU in float64: the same on every rank."""
        rows = self._seen_rows(seen).cpu()
        G, S = unpack(self.gram.cpu(), self.width), self.sums.cpu()[rows].T     # (D, D), (D, rows)
        evals, U = torch.linalg.eigh(G)
        A = U.T @ S
        Gv = U.T @ unpack(self.val_gram.cpu(), self.width) @ U
        Sv = U.T @ self.val_sums.cpu()[rows].T
        n = float(self.val_counts.cpu()[rows].sum())
        scale = float(torch.diagonal(G).mean().clamp(min=1e-12))
        errors = []
        for r in RIDGE_GRID:
            Wr = A / (evals.clamp(min=0) + r * scale)[:, None]         # W in U's basis
            errors.append(n - 2 * float((Wr * Sv).sum()) + float((Wr * (Gv @ Wr)).sum()))
        # no validation samples (a dataset without a val split): the grid's middle, stated
        best = min(range(len(errors)), key=errors.__getitem__) if n > 0 else len(RIDGE_GRID) // 2
        lam = RIDGE_GRID[best] * scale
        W = U @ (A / (evals.clamp(min=0) + lam)[:, None])
        self.weights.zero_()
        self.weights[:, rows.to(self.weights.device)] = W.to(self.weights.device)
        self.ridge.fill_(lam)
        return lam, errors if n > 0 else []

    @torch.no_grad()
    def scores(self, feats, batch, seen):
        """The ridge outputs per session (class targets: a session's best class's)."""
        rows = self._seen_rows(seen)
        out = self.features(feats, batch) @ self.weights[:, rows]             # (B, rows)
        return _best_per_session(out, self.row_session[rows], seen)

    @staticmethod
    def confidence(scores: torch.Tensor) -> torch.Tensor:
        """The ridge regresses one-hot targets: its outputs estimate each session's
        probability. Clipped at 0 and normalised to sum 1 (uniform when none is positive)."""
        clipped = scores.clamp(min=0)
        total = clipped.sum(-1, keepdim=True)
        return torch.where(total > 0, clipped / total.clamp(min=1e-12),
                           torch.full_like(clipped, 1 / scores.shape[-1]))

    def adopt_checkpoint(self, tensors: dict, path) -> dict | None:
        """Called before a checkpoint's tensors are copied in (`tensors`: its identifier.*
        entries, prefix removed); returns replacements for them, or None. A checkpoint from
        before the layer features (no `layout`; features [q_v, q_t, pooled, availability]
        -> session, full Gram matrices) is taken as it is: this router takes that layout,
        says so in one line, and routes as the checkpoint's model did. A layout other than
        this recipe's stops with one line."""
        if "gram" not in tensors:
            return None
        dim, pooled_dim = self.query_dims
        base = 2 * dim + pooled_dim
        legacy = [LAYOUT_VERSION, base, base + 3, len(self.session_classes)]
        old = "layout" not in tensors
        if old and tuple(tensors["gram"].shape) != (base + 3, base + 3):
            raise ValueError(f"{path}: its analytic task identifier has a {tuple(tensors['gram'].shape)} "
                             f"Gram, not the {(base + 3,) * 2} of [q_v, q_t, pooled] at this "
                             "backbone's widths")
        theirs, mine = legacy if old else tensors["layout"].tolist(), self.layout.tolist()
        if theirs != mine and theirs != legacy:
            raise ValueError(f"{path}: its analytic task identifier was fitted on another feature "
                             f"layout (version, raw width, width, targets, layers: {theirs}; this "
                             f"recipe's: {mine}): set task_id.analytic.layers / max_dims / reduce / targets "
                             "as its recipe did")
        if theirs != mine:
            print(f"{path}: its analytic task identifier predates the layer features (task_id."
                  "layers, max_dims, reduce, targets): it routes with the features it was fitted "
                  "on, [q_v, q_t, pooled] -> session", flush=True)
            self._build([], [], None, "session", 0)
        if not old:
            return None
        return {**tensors, "layout": self.layout.cpu(), "gram": pack(tensors["gram"]),
                "val_gram": pack(tensors["val_gram"])}


# ------------------------------------------------------------------ building

def build_task_identifier(cfg, session_classes: list[list[int]], num_classes: int,
                          backbone) -> TaskIdentifier:
    """The identifier `cfg.source` names (task_id section of a recipe)."""
    from delo_dist.config import plugin_class
    return plugin_class(cfg).build(cfg.settings, session_classes, num_classes, backbone)
