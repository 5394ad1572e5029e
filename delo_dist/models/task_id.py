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
    ridge regressor from phi = [q_v, q_t, pooled (each L2-normalised, a missing
    modality's query zeroed), one-hot availability] to the one-hot session. It keeps only
    G = sum phi phi^T and S_k = sum_{i in k} phi_i (float64), so the solution
    W = (G + lambda I)^-1 [S_0 .. S_k] is exact without storing a sample. lambda: the value of
    a log grid that minimises the squared error on the validation split, computed exactly
    from the same statistics of the val split (Gram, per-session sums, count).

EMA sources update at every training step (`observe`, from all-reduced sums). Statistics
sources fit at the end of each session (`fit`): one adapter-free pass over the session's
train split (and val split for `analytic`), accumulated per rank and all-reduced once, then
a solve on CPU in float64: every rank holds the same state. All state is buffers, so the
model checkpoint carries it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

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

    def route(self, feats: dict, batch: dict, seen: int) -> torch.Tensor:
        raise NotImplementedError

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
    def select(self, q: torch.Tensor, present: torch.Tensor, seen: int) -> torch.Tensor:
        """q (B, M, d), present (B, M) bool -> (B,) session ids among the first `seen`."""
        sims = F.cosine_similarity(q.unsqueeze(1).float(), self.keys[:seen].unsqueeze(0), dim=-1)
        weight = present.unsqueeze(1).float()                          # (B, 1, M)
        score = (sims * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)  # (B, seen)
        return score.argmax(dim=1)


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
    def route(self, feats, batch, seen):
        return self.select(*self.query(feats, batch), seen)


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
    def route(self, feats, batch, seen):
        cand = ((self.class_session >= 0) & (self.class_session < seen)).nonzero().squeeze(1)
        protos = self.sums[cand] / self.counts[cand].clamp(min=1).unsqueeze(-1)   # (C', 2, d)
        q = torch.stack([feats["q_v"], feats["q_t"]], 1).double()                 # (B, 2, d)
        sims = F.cosine_similarity(q[:, None], protos[None], dim=-1)              # (B, C', 2)
        w = present(batch, q.device)[:, None, :].double() * (self.counts[cand] > 0)[None].double()
        score = (sims * w).sum(-1) / w.sum(-1).clamp(min=1)
        score = score.masked_fill(w.sum(-1) == 0, -2.0)     # a prototype it cannot compare to
        return self.class_session[cand][score.argmax(1)]


# ------------------------------------------------------------------ analytic (ridge) router

RIDGE_GRID = [10.0 ** e for e in torch.arange(-6.0, 3.01, 0.5).tolist()]  # x mean diag(G)


def ridge_features(feats: dict, batch: dict) -> torch.Tensor:
    """phi (B, 3d + 3) float64: [q_v, q_t, pooled] L2-normalised, missing ones zeroed, then
    the one-hot availability (it also plays the intercept)."""
    has = present(batch, feats["q_v"].device).double()
    parts = [F.normalize(feats["q_v"].double(), dim=-1) * has[:, :1],
             F.normalize(feats["q_t"].double(), dim=-1) * has[:, 1:],
             F.normalize(feats["pooled"].double(), dim=-1),
             F.one_hot(availability(batch).to(has.device), 3).double()]
    return torch.cat(parts, 1)


class AnalyticRouter(TaskIdentifier):
    name = "analytic"
    needs_pooled = True
    fits_per_session = True

    @classmethod
    def build(cls, settings, session_classes, num_classes, backbone):
        return cls(len(session_classes), backbone.query_dim, backbone.hidden_size)

    def __init__(self, n_sessions: int, dim: int, pooled_dim: int | None = None):
        super().__init__()
        D = 2 * dim + (pooled_dim or dim) + 3   # [q_v, q_t, pooled, availability]
        f64 = dict(dtype=torch.float64)
        self.register_buffer("gram", torch.zeros(D, D, **f64))
        self.register_buffer("sums", torch.zeros(n_sessions, D, **f64))
        self.register_buffer("val_gram", torch.zeros(D, D, **f64))
        self.register_buffer("val_sums", torch.zeros(n_sessions, D, **f64))
        self.register_buffer("val_counts", torch.zeros(n_sessions, **f64))
        self.register_buffer("weights", torch.zeros(D, n_sessions, **f64))
        self.register_buffer("ridge", torch.zeros((), **f64))

    @staticmethod
    def _stats(batches, features, D: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gram = torch.zeros(D, D, dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        total = torch.zeros(D, dtype=torch.float64, device=device)
        for batch in batches:
            phi = ridge_features(features(batch), batch)
            gram += phi.T @ phi
            total += phi.sum(0)
            count += len(phi)
        return dist.all_reduce_sum(gram), dist.all_reduce_sum(total), dist.all_reduce_sum(count)

    @torch.no_grad()
    def fit(self, session, train, val, features):
        D, dev = self.gram.shape[0], self.gram.device
        g, s, _ = self._stats(train, features, D, dev)
        self.gram += g
        self.sums[session] = s
        g, s, n = self._stats(val, features, D, dev)
        self.val_gram += g
        self.val_sums[session] = s
        self.val_counts[session] = n
        lam, errors = self.solve(session + 1)
        return {"ridge_lambda": lam, "ridge_val_error": min(errors) if errors else float("nan")}

    def solve(self, seen: int) -> tuple[float, list[float]]:
        """W = (G + lambda I)^-1 S for the lambda of the grid with the least validation
        squared error ||Y - Phi W||^2 = n - 2 tr(W^T S_val) + tr(W^T G_val W), exact from the
        statistics. On CPU in float64: the same on every rank."""
        G, S = self.gram.cpu(), self.sums[:seen].cpu().T                  # (D, D), (D, seen)
        evals, U = torch.linalg.eigh(G)
        A = U.T @ S
        Gv, Sv = U.T @ self.val_gram.cpu() @ U, U.T @ self.val_sums[:seen].cpu().T
        n = float(self.val_counts[:seen].sum())
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
        self.weights[:, :seen] = W.to(self.weights.device)
        self.ridge.fill_(lam)
        return lam, errors if n > 0 else []

    @torch.no_grad()
    def route(self, feats, batch, seen):
        return (ridge_features(feats, batch) @ self.weights[:, :seen]).argmax(1)


# ------------------------------------------------------------------ building

def build_task_identifier(cfg, session_classes: list[list[int]], num_classes: int,
                          backbone) -> TaskIdentifier:
    """The identifier `cfg.source` names (task_id section of a recipe)."""
    from delo_dist.config import plugin_class
    return plugin_class(cfg).build(cfg.settings, session_classes, num_classes, backbone)
