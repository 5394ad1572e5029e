"""DeLo's dual decomposed low-rank experts (paper, "Decomposed Low-Rank Expert Architecture").

A `FactorPool` holds E factor pairs (a_e, b_e) and its two routers. Per sample, with query q:
    p_A = softmax(W_A q);  top-r of p_A selects the A factors          (Eq. 3)
    p_B = softmax(W_B q + compat(selected A));  top-r selects the B factors
          (the two scores are fused by addition, as the text after Eq. 3 says)
    delta h = alpha * sum_i b_(i) (a_(i) . h)                          (Eq. 2 and 4)
The top-r choice stays hard. To give the routers a gradient, each selected pair is scaled by
g = p - stop_grad(p) + 1: exactly 1 in the forward pass (the paper's equations unchanged),
d g / d p = 1 in the backward pass (a straight-through estimator).

`factor_rank` f: 1 gives the paper's rank-one pairs (a_e in R^d_in, b_e in R^d_out); f = r
gives the official code's block shapes (A_e in R^{f x d_in}, B_e in R^{d_out x f}), whose
parameter counts reproduce the paper's Table 5; each selected pair then adds a rank-f term.
The update is applied to activations through the factors: (B, N, d_in) -> (B, N, r, f) ->
(B, N, d_out). `delta_naive` materialises the per-sample d_out x d_in matrix; it exists only
to check the fast path and to be timed against it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from delo_dist.models.adapters import PROXY_IMAGE, PROXY_TEXT
from delo_dist.models.method import Method, complete_scale
from delo_dist.plugins import BenchEntry, BenchVariant


class FactorPool(nn.Module):
    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, factor_rank: int = 1,
                 a_init_std: float | None = None):
        super().__init__()
        self.rank, self.factor_rank = rank, factor_rank
        std = a_init_std if a_init_std is not None else 1.0 / math.sqrt(d_in)
        self.A = nn.Parameter(torch.randn(experts, factor_rank, d_in) * std)  # Gaussian
        self.B = nn.Parameter(torch.zeros(experts, d_out, factor_rank))        # zero: delta starts at 0
        self.router_a = nn.Linear(d_in, experts)
        self.router_b = nn.Linear(d_in, experts)
        # Scores each B factor from the chosen A factors, position by position (r, d_in, E).
        self.compat = nn.Parameter(torch.randn(rank, d_in, experts) / math.sqrt(rank * d_in))

    def route(self, q: torch.Tensor):
        """q (B, d_in) -> selected A (B, r, f, d_in), B (B, r, d_out, f), gates (B, r)."""
        p_a = self.router_a(q).softmax(-1)
        top_a = p_a.topk(self.rank, dim=-1).indices                   # (B, r), best first
        a_sel = self.A[top_a]
        compat = torch.einsum("brfd,rde->be", a_sel.detach(), self.compat)
        p_b = (self.router_b(q) + compat).softmax(-1)
        top_b = p_b.topk(self.rank, dim=-1).indices
        b_sel = self.B[top_b]
        g_a, g_b = p_a.gather(1, top_a), p_b.gather(1, top_b)
        gate = (g_a - g_a.detach() + 1.0) * (g_b - g_b.detach() + 1.0)  # == 1, carries grad
        return a_sel, b_sel, gate, top_a, top_b

    def delta(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        a_sel, b_sel, gate, _, _ = self.route(q)
        z = torch.einsum("bnd,brfd->bnrf", x, a_sel) * gate[:, None, :, None]
        return torch.einsum("bnrf,brof->bno", z, b_sel)

    def delta_naive(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        a_sel, b_sel, gate, _, _ = self.route(q)
        dw = torch.einsum("brof,brfd,br->bod", b_sel, a_sel, gate)    # (B, d_out, d_in)
        return torch.einsum("bnd,bod->bno", x, dw)


class DeloSession(nn.Module):
    """One session's adapter for one linear: a visual and a textual pool (or one unified)."""

    def __init__(self, d_in: int, d_out: int, cfg):
        super().__init__()
        self.alpha = cfg.alpha
        self.modality_pools = cfg.modality_pools
        rows = cfg.factor_rank if cfg.factor_rank is not None else cfg.rank
        make = lambda: FactorPool(d_in, d_out, cfg.experts, cfg.rank, rows,  # noqa: E731
                                  cfg.a_init_std)
        if cfg.modality_pools:
            self.visual, self.textual = make(), make()
        else:
            self.unified = make()

    def delta(self, x, q_v, q_t, q_all, naive: bool = False):
        if not self.modality_pools:  # ablation: one pool routed by the whole sequence's mean
            if naive:
                return self.alpha * self.unified.delta_naive(x, q_all)
            return gathered_product(x, [self.unified.route(q_all)], self.alpha)
        if naive:
            return self.alpha * (self.visual.delta_naive(x, q_v) + self.textual.delta_naive(x, q_t))
        return gathered_product(x, [self.visual.route(q_v), self.textual.route(q_t)], self.alpha)


def gathered_product(x: torch.Tensor, routes: list, alpha: float) -> torch.Tensor:
    """alpha * sum over pools of sum_i gate_i b_(i) (a_(i) . x), all pools in one low-rank
    product: their selected factors are concatenated along the rank axis, (B, P*r*f, d_in)
    and (B, P*r*f, d_out), and x goes through two batched matmuls, whatever P."""
    a = torch.cat([r[0] for r in routes], 1)                      # (B, P*r, f, d_in)
    b = torch.cat([r[1] for r in routes], 1)                      # (B, P*r, d_out, f)
    gate = torch.cat([r[2] for r in routes], 1) * alpha           # (B, P*r)
    n_b, k, f, d_in = a.shape
    z = torch.bmm(x, a.reshape(n_b, k * f, d_in).transpose(1, 2))  # (B, N, P*r*f)
    z = z * gate.repeat_interleave(f, 1).unsqueeze(1)
    return torch.bmm(z, b.transpose(2, 3).reshape(n_b, k * f, -1))  # (B, N, d_out)


# ------------------------------------------------------------ losses (paper, Eq. 9 and 10)
# L_align = 1 - cos(q_v, q_t), on complete samples, averaged over the adapted linears.
# L_con: KL(p_true || p_proxy) on complete samples, where p_proxy comes from a pass in which one
#   modality's pools are routed by the other modality's query, as they would be if that
#   modality were missing. Which one is simulated is drawn per sample from its key (so the
#   choice does not depend on the number of ranks). p_true is the target and is detached: the
#   proxy path is taught to reason like the real one, not the reverse.
# Both are sums over this rank's complete samples times `complete_scale`: after the ranks'
# gradients are averaged, each is the mean over the global batch's complete samples.

def alignment_sum(queries: list, complete: torch.Tensor) -> torch.Tensor:
    """Sum over complete samples of mean over linears of (1 - cos(q_v, q_t))."""
    per_sample = torch.stack([1 - F.cosine_similarity(qv, qt, dim=-1) for qv, qt in queries]).mean(0)
    return per_sample[complete].sum()


def proxy_choice(keys: list[str], epoch: int) -> torch.Tensor:
    """Per sample, which modality the consistency pass pretends is missing."""
    return torch.tensor([PROXY_TEXT if zlib.crc32(f"{k}/{epoch}".encode()) % 2 == 0 else PROXY_IMAGE
                         for k in keys])


def consistency_sum(logits_true: torch.Tensor, logits_proxy: torch.Tensor,
                    multilabel: bool) -> torch.Tensor:
    target = logits_true.detach()
    if multilabel:  # KL between per-class Bernoulli distributions, summed over classes
        p, lp, lq = target.sigmoid(), F.logsigmoid(target), F.logsigmoid(logits_proxy)
        l1p, l1q = F.logsigmoid(-target), F.logsigmoid(-logits_proxy)
        return (p * (lp - lq) + (1 - p) * (l1p - l1q)).sum(-1).sum()
    return F.kl_div(logits_proxy.log_softmax(-1), target.log_softmax(-1), log_target=True,
                    reduction="sum")


@dataclass
class DeloSettings:
    """method.delo.*: the paper's E, r, alpha and loss weights, the reference code's targets."""
    experts: int = 16                       # E: factor pairs per pool
    rank: int = 4                           # r: factor pairs selected per sample
    # rows of each factor: null = r, the official code's block shape (Table 5's counts);
    # 1 = the paper's rank-one pairs of Eq. 2 and 4 (an ablation row)
    factor_rank: Optional[int] = None
    alpha: float = 2.0
    a_init_std: Optional[float] = None      # None: 1/sqrt(d_in), LoRA-like scale
    modality_pools: bool = True             # False: ablation "w/o modality-specific pool"
    cross_modal_guide: bool = True          # False: ablation "w/o cross-modal guide"
    lambda_align: float = 0.1
    lambda_con: float = 0.1

    def validate(self, check) -> None:
        check(self.experts >= 1, "experts", "an int >= 1", self.experts)
        check(1 <= self.rank <= self.experts, "rank",
              f"an int in [1, experts={self.experts}] (r <= E)", self.rank)
        check(self.factor_rank is None or self.factor_rank >= 1, "factor_rank",
              "null (= rank) or an int >= 1", self.factor_rank)
        check(self.lambda_align >= 0, "lambda_align", "a non-negative weight", self.lambda_align)
        check(self.lambda_con >= 0, "lambda_con", "a non-negative weight", self.lambda_con)


class Delo(Method):
    """DeLo: per session, a visual and a textual factor pool around each adapted linear,
    routed per sample by its modality queries (the other modality's when one is missing);
    L = L_c + lambda_align L_align + lambda_con L_con (paper, Eq. 10)."""
    name = "delo"
    Settings = DeloSettings
    guide_queries = True      # the pools route by both modalities' queries
    # python -m delo_dist.bench: the performance targets' ratios and the variant models they
    # need (row kinds: delo_dist/bench/rows.py)
    bench = BenchEntry(
        overrides={"method.delo.experts": 16, "method.delo.rank": 4},
        rows=("train", "train_ce", "oracle", "agnostic"),
        variants={"naive": BenchVariant(naive=True, rows=("train", "oracle")),
                  "fr1": BenchVariant({"method.delo.factor_rank": 1},
                                      rows=("train", "train_ce", "oracle")),
                  "first_layer": BenchVariant({"task_id.source": "first_layer"},
                                              rows=("oracle", "agnostic")),
                  "T1": BenchVariant(sessions=1, rows=("train_ce", "agnostic")),
                  "T10": BenchVariant(sessions=10, rows=("train_ce", "agnostic"))},
        # the target compares the same rank: rank-one factor pairs (factor_rank 1, Eq. 2 and 4),
        # r per pool, against peft's rank-r LoRA; at factor_rank = r (the default, Table 5's
        # blocks) each pool applies rank r x r: its cost is the next, informative, ratio
        ratios={"train_delo_over_peft_lora": ("train_ce/delo_fr1", "train/lora_peft", ("<=", 1.05)),
                "train: delo (factor_rank r) / peft lora": ("train_ce/delo", "train/lora_peft", None),
                "train_full_over_ce": ("train/delo", "train_ce/delo", ("<=", "1 + cf")),
                "infer_agnostic_over_oracle": ("agnostic/delo_first_layer",
                                               "oracle/delo_first_layer", ("<=", 1.03)),
                "infer_agnostic_pooled_over_oracle": ("agnostic/delo", "oracle/delo", None),
                "train_T10_over_T1": ("train_ce/delo_T10", "train_ce/delo_T1", ("<=", 1.05)),
                "infer_T10_over_T1": ("agnostic/delo_T10", "agnostic/delo_T1", ("<=", 1.05)),
                "train: delo / delo naive": ("train/delo", "train/delo_naive", None),
                "infer oracle: delo / delo naive": ("oracle/delo", "oracle/delo_naive", None),
                "train: delo factor_rank 1 / r": ("train/delo_fr1", "train/delo", None),
                "infer oracle: delo factor_rank 1 / r": ("oracle/delo_fr1", "oracle/delo", None)})

    @property
    def routed(self) -> bool:
        return self.cfg.modality_pools   # the unified-pool ablation routes by the sequence mean

    def describe(self) -> str:
        c = self.cfg
        rows = c.factor_rank if c.factor_rank is not None else c.rank
        return f"E={c.experts}, r={c.rank}, factor_rank={rows}"

    def attach(self, model) -> None:
        model.ctx.cross_modal_guide = self.cfg.cross_modal_guide
        super().attach(model)

    def make_session(self, d_in, d_out, **_):
        return DeloSession(d_in, d_out, self.cfg)

    def forward(self, model, batch, session, epoch=0, aux=True):
        """L_con's proxy pass rides in the main forward: one pass over [batch; its complete
        samples with a simulated missing modality] (ctx.proxy per row). The backbone is frozen
        and in eval mode, so each row's output is what a separate pass would give (up to float
        reduction order), and the step pays for one larger batch instead of a second forward."""
        c = self.cfg
        use_align = aux and self.routed and c.lambda_align > 0
        use_con = aux and self.routed and c.lambda_con > 0 and c.cross_modal_guide
        complete = ~(batch["missing_text"] | batch["missing_image"])
        n = len(complete)
        idx = complete.nonzero().squeeze(1) if use_con else complete.new_zeros(0, dtype=torch.long)
        out = {"complete": complete, "proxy_idx": idx}
        if len(idx):
            proxy = proxy_choice([batch["keys"][i] for i in idx.tolist()], epoch).to(complete.device)
            both = model.session_forward(batch, session, record=use_align, proxy_rows=(idx, proxy))
            out["logits"], out["logits_proxy"] = both[:n], both[n:]
        else:
            out["logits"] = model.session_forward(batch, session, record=use_align)
        if use_align:  # queries of the main rows only
            out["queries"] = [(q_v[:n].float(), q_t[:n].float()) for q_v, q_t in model.ctx.queries]
        return out

    def loss_terms(self, model, batch, out, session):
        """Auxiliary terms on complete samples: this rank's sum / (global count / world)."""
        c, terms = self.cfg, {}
        scale = complete_scale(batch, out["complete"])
        if "queries" in out:
            terms["align"] = (c.lambda_align, alignment_sum(out["queries"], out["complete"]) * scale)
        if self.routed and c.lambda_con > 0 and c.cross_modal_guide:
            idx, logits = out["proxy_idx"], out["logits"].float()
            con = (consistency_sum(logits[idx], out["logits_proxy"].float(), model.multilabel) * scale
                   if len(idx) else logits.new_zeros(()))
            terms["con"] = (c.lambda_con, con)
        return terms
