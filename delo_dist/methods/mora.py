"""MoRA on a two-encoder backbone (CLIP): "MoRA: Missing Modality Low-Rank Adaptation for
Visual Recognition" (Zhao et al.), written from the paper and the public code's structure.

Per adapted layer index l and session, shared factors A (d_text x r) and B (d_image x r)
couple the two encoders through Gram matrices (dimension-free, r x r):
    text linears of layer l:   S_t = A (B^T B) A^T      (d_text x d_text)
    image linears of layer l:  S_v = B (A^T A) B^T      (d_image x d_image)
(one shared pair per layer for its key and value projections, as in the MoRA code). Each
adapted linear also has its own LoRA P = A_m B_m (rank r) and two magnitude vectors, DoRA
style, one per update, over the input columns (norms over dim 0, as the MoRA code):
    W' = m_s * (W0 + alpha S^T) / ||W0 + alpha S^T||_col
       + m_p * (W0 + alpha P^T) / ||W0 + alpha P^T||_col
Initialisation as the MoRA code: A, B, A_m ~ N(0, 1/r), B_m = 0, m_s = m_p = ||W0||_col. So
the model does NOT start as the frozen one: with B_m = 0 the specific term is W0 itself and
the shared term adds a second copy of W0's column norms, W' = W0 + ||W0||_col dir(W0 + alpha S),
a relative Frobenius change ||W' - W0|| / ||W0|| of exactly 1 in every adapted linear
(about 2 W0 when alpha S is small beside W0; pinned in tests/test_mora.py).

Training applies W' to activations, never forming a d x d matrix: with c = m / n per column,
    x W'^T = (x * (c_s + c_p)) W0^T + alpha (x * c_s) S + alpha (x * c_p) A_m B_m
(S symmetric), the low-rank terms through (B, N, r), and the column norms from r-sized
products (`column_norms`). Dropout (0.1) acts on the low-rank paths' input only (the MoRA
code drops the frozen path's input too). Inference merges: `merged_forward` runs F.linear
with W' formed once per parameter version and cached (a copy: W0 stays as it is, since
every session merges into the same frozen weight). Per-sample session routing: a batch
routed to one session runs merged; a batch mixing sessions runs the activation path in one
pass, each adapted linear applying each session's update to its own samples (one merged
pass per session's sub-batch was slower in `python -m delo_dist.bench --clip`).

Defaults (MoRA code's model config): key and value projections of both encoders from layer
10 of 12 on (`method.mora.layers_from`; null: the top ceil(L/6) layers, i.e. 10-11 of 12 and
the upper layer of a 2-layer tiny model), rank 8 for the shared and specific factors, alpha
0.1, dropout 0.1. Not modality-routed: no routers, so DeLo's L_align / L_con do not apply.
Continual use: `mora` (one set per session, chosen by the task identifier) and `seq_mora`
(one set fine-tuned across sessions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from delo_dist.models.method import Method
from delo_dist.plugins import BenchEntry, BenchVariant

EPS = 1e-5  # norm clamp, as the MoRA code


class SharedFactors(nn.Module):
    """A (text) and B (image) of one layer and session; each created by its first user."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.factors = nn.ParameterDict()

    def factor(self, modality: str, d: int) -> nn.Parameter:
        if modality not in self.factors:
            self.factors[modality] = nn.Parameter(torch.randn(d, self.rank) / math.sqrt(self.rank))
        return self.factors[modality]

    def own_and_gram(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        other = "image" if modality == "text" else "text"
        if other not in self.factors:
            raise ValueError(f"MoRA couples text and image linears of the same layer, but this "
                             f"layer's {other} encoder has no adapted linear (backbone.targets)")
        u, v = self.factors[modality], self.factors[other]
        return u, v.t() @ v                                          # (d, r), (r, r)


class MoraSession(nn.Module):
    uses_queries = False  # static per session: no routing

    def __init__(self, base: nn.Linear, modality: str, shared: SharedFactors, cfg):
        super().__init__()
        if base.in_features != base.out_features:
            raise ValueError("MoRA's Gram update needs a square projection (key/value), got "
                             f"{base.out_features} x {base.in_features}")
        d, r = base.in_features, cfg.rank
        self._base = (base,)  # a reference, not a submodule: the frozen weight is not ours
        self.modality, self.shared, self.alpha = modality, shared, cfg.alpha
        shared.factor(modality, d)
        norm = base.weight.detach().norm(dim=0)                      # (d_in,)
        self.m_shared = nn.Parameter(norm.clone())
        self.m_specific = nn.Parameter(norm.clone())
        self.A = nn.Parameter(torch.randn(d, r) / math.sqrt(r))
        self.B = nn.Parameter(torch.zeros(r, d))
        self.dropout = cfg.dropout
        self._merged_cache: tuple | None = None

    # ------------------------------------------------------------ the formula
    def shared_update(self) -> torch.Tensor:
        """S (d x d), formed only for merging and tests."""
        u, gram = self.shared.own_and_gram(self.modality)
        return u @ gram @ u.t()

    def column_norms(self, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """||W0 + alpha S^T||_col and ||W0 + alpha P^T||_col without forming S or P:
        ||w_j + a s_j||^2 = ||w_j||^2 + 2a <w_j, s_j> + a^2 ||s_j||^2, each term from
        (d, r) products."""
        a = self.alpha
        u, gram = self.shared.own_and_gram(self.modality)
        w2 = (w0 * w0).sum(0)
        ug = u @ gram                                                  # (d, r)
        ws = ((w0.t() @ ug) * u).sum(1)                                # diag(W0^T S)
        ss = ((ug @ (u.t() @ u) @ gram) * u).sum(1)                    # diag(S^T S)
        n_s = (w2 + 2 * a * ws + a * a * ss).clamp(min=0).sqrt()
        # P^T column j = (A[j] B)^T: <w_j, .> = A[j] . (B W0)[:, j]; ||.||^2 = A[j] (B B^T) A[j]
        wp = (self.A * (self.B @ w0).t()).sum(1)
        pp = ((self.A @ (self.B @ self.B.t())) * self.A).sum(1)
        n_p = (w2 + 2 * a * wp + a * a * pp).clamp(min=0).sqrt()
        return n_s.clamp(min=EPS), n_p.clamp(min=EPS)

    def merged_weight(self) -> torch.Tensor:
        base = self._base[0]
        w0 = base.weight
        s = self.alpha * self.shared_update().t()
        p = self.alpha * (self.A @ self.B).t()
        ws, wp = w0 + s, w0 + p
        return (self.m_shared * ws / ws.norm(dim=0).clamp(min=EPS)
                + self.m_specific * wp / wp.norm(dim=0).clamp(min=EPS))

    # ------------------------------------------------------------ forward paths
    def delta(self, x, q_v=None, q_t=None, q_all=None, naive: bool = False):
        """x W'^T - x W0^T, applied to activations (see the module docstring)."""
        w0 = self._base[0].weight
        if naive:  # benchmark only: the d x d adapted weight, formed
            return F.linear(x, self.merged_weight() - w0)
        n_s, n_p = self.column_norms(w0)
        c_s, c_p = self.m_shared / n_s, self.m_specific / n_p
        u, gram = self.shared.own_and_gram(self.modality)
        # Dropout while gradients flow (a training forward), never at evaluation: the model
        # keeps the frozen backbone's modules, adapters included, out of train/eval walks.
        xd = F.dropout(x, self.dropout, training=torch.is_grad_enabled())
        low = ((xd * c_s) @ u) @ gram @ u.t() + ((xd * c_p) @ self.A) @ self.B
        return F.linear(x * (c_s + c_p - 1.0), w0) + self.alpha * low

    def merged_forward(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Inference with W' merged: one F.linear, W' cached until a parameter changes."""
        params = [p for p in self.parameters()]
        key = (base.weight.data_ptr(), base.weight._version, *(p._version for p in params),
               *(p.data_ptr() for p in params))
        if self._merged_cache is None or self._merged_cache[0] != key:
            with torch.no_grad():
                self._merged_cache = (key, self.merged_weight().to(x.dtype))
        return F.linear(x, self._merged_cache[1], base.bias)


@dataclass
class MoraSettings:
    """method.mora.* (also seq_mora's): the MoRA code's defaults."""
    rank: int = 8                           # shared and modality-specific factors
    alpha: float = 0.1
    dropout: float = 0.1
    layers_from: Optional[int] = None       # first adapted layer; null: the top ceil(L/6) layers

    def validate(self, check) -> None:
        check(self.rank >= 1, "rank", "an int >= 1", self.rank)
        check(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        check(self.layers_from is None or self.layers_from >= 0, "layers_from",
              "null or an int >= 0", self.layers_from)


class Mora(Method):
    """MoRA: one set of Gram-coupled updates per session, chosen per sample by the task
    identifier; inference merged when a batch routes to one session."""
    name = "mora"
    Settings = MoraSettings
    needs = {"two_encoders": "MoRA couples a text and an image encoder's linears of the same "
                             "layer through shared factors"}
    mergeable = True
    targets = ("k_proj", "v_proj")
    bench = BenchEntry(  # merged inference (a batch of one session) against unmerged
        overrides={"method.mora.rank": 8}, rows=("train", "oracle", "one_session", "agnostic"),
        variants={"unmerged": BenchVariant(merged=False, rows=("one_session",))},
        ratios={"infer one session: mora merged / unmerged": ("one_session/mora",
                                                              "one_session/mora_unmerged", None),
                "infer one session: mora merged / frozen backbone": ("one_session/mora",
                                                                     "frozen/{backbone}", None),
                "infer mixed / one session: mora": ("oracle/mora", "one_session/mora", None)})

    def __init__(self, settings=None):
        super().__init__(settings)
        self._factors: dict[tuple, SharedFactors] = {}  # (layer, session) -> both encoders' pair

    def describe(self) -> str:
        return f"r={self.cfg.rank}, alpha={self.cfg.alpha}"

    def select_linears(self, backbone, targets):
        """The targets (k/v projections), in the upper layers only (as the MoRA code)."""
        linears = super().select_linears(backbone, targets)
        start = self.cfg.layers_from
        sites = {n: backbone.linear_site(n) for n in linears}
        keep = {n: m for n, m in linears.items() if sites[n].layer >= (
            start if start is not None else _upper_start(sites[n].num_layers))}
        if not keep:
            raise ValueError(f"method.mora.layers_from={start}: no linear left to adapt")
        self._sites = {n: sites[n] for n in keep}   # name -> LinearSite, read by make_session
        return keep

    def make_session(self, d_in, d_out, *, name, base, session, **_):
        site = self._sites[name]
        shared = self._factors.setdefault((site.layer, session), SharedFactors(self.cfg.rank))
        return MoraSession(base, site.modality, shared, self.cfg)


class SeqMora(Mora):
    """One MoRA set fine-tuned session after session (a new head per session)."""
    name = "seq_mora"
    section = "mora"
    shared_across_sessions = True
    bench = None  # costs what mora costs: the same set under every session's name


def _upper_start(num_layers: int) -> int:
    """The MoRA code's adapted layers: the top ceil(L/6) (10-11 of 12)."""
    return num_layers - math.ceil(num_layers / 6)
