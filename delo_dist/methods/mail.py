"""MAIL: a mixture of LoRA experts around frozen linears ("MAIL: Mixture of LoRA Experts for
Adaptive Incomplete Multimodal Learning", Eq. 8-11).

Per adapted linear, E_l experts (A_e in R^{r x d_in}, B_e in R^{d_out x r}) and a router
W_r in R^{E_l x d_in}; per routed unit with router input u:
    p = softmax(W_r u)
    top_k:      g = p on the k largest entries, renormalised to sum 1, 0 elsewhere
    soft_merge: g = p (every expert, weighted: Zadouri et al.'s soft merging; = top-E)
    delta h = (alpha / r) * sum_e g_e B_e A_e dropout(h)
Why these gates. Eq. 6 makes R(x) "a probability distribution over experts ... enabling soft
selection or sparse routing", citing Shazeer et al. (2017), whose sparse gate is the softmax
over the kept logits: p renormalised over the chosen experts. That is the forward pass at
every k. At k = 1 it is identically 1, and the router would get no gradient from the task
(it would stay at its random initialisation, and the Top-1 ablation with it), so there the
chosen gate is g = p - stop_grad(p) + 1: exactly 1 forwards (Eq. 5-6 unchanged), d g / d p
= 1 backwards (a straight-through estimator, as DeLo's adapters here). Using p itself as the
top-1 gate (the Switch Transformer's choice) would learn too, but changes the forward pass
and would make Top-1 differ from Top-2 in the gate's scale, not only in k. At k >= 2 the
renormalised gate has a gradient of its own and is used as it is.
The experts act on activations: (B, N, d_in) -> (B, N, E r) -> (B, N, d_out), with the gates
spread over each expert's r columns; no d_out x d_in matrix is formed. Every expert's columns
are computed (unselected ones gated to 0): one dense matmul with static shapes whatever the
routing, E r = 20 columns per token at the paper's E = 5, r = 4.

Where the paper is silent (recipe keys under `method.mail`):
  - router_input "sample" (default): one routing per instance from the mean of its real
    tokens at that linear's input (`q_all`, dummy tokens of a missing modality included, so
    the routing sees the missingness), matching the paper's "fixed combination of experts"
    per instance; "token": every token routed by itself (the classic MoE layer of Eq. 5-6).
  - balance: weight of the Switch Transformer load-balancing loss E * sum_e f_e P_e (P_e: mean
    router probability over the routed units; f_e: expert e's share of the top-k slots;
    under soft_merge, where every expert gets every unit, f_e = P_e, its share of the merge
    weight, so the loss is E * sum_e P_e^2 = 1 + E * sum_e (P_e - 1/E)^2, still differentiable,
    1 only when the mean gates are uniform), averaged over the adapted linears; 0 (the
    default, as the paper mentions none) turns it off.
  - A's initial scale: Gaussian as the paper says (Sec. 3.3, B zero), std 1 / sqrt(d_in)
    (the paper gives none): A x then keeps the scale of one coordinate of x, and it is the
    scale of this repository's LoRA and DeLo A factors (`method.a_init_std`'s default), so
    the low-rank methods compared here start alike. (peft's default is Kaiming-uniform,
    std 1 / sqrt(3 d_in); its "gaussian" option has std 1 / r.)
  - LoRA dropout is active when gradients are (the training forward): the frozen backbone
    keeps every submodule in eval mode, adapters included, so `self.training` cannot tell.

Targets per variant (linear names are matched on the backbone, any depth prefix):
  linear    (MAIL-l): the MLP linears of each layer: ViLT `intermediate.dense`, `output.dense`
                      (not the attention's output.dense); CLIP `mlp.fc1`, `mlp.fc2`;
  attention (MAIL-a): query, key, value (Eq. 9-11): ViLT `attention.attention.{query,key,value}`,
                      CLIP `self_attn.{q,k,v}_proj`;
  both      (MAIL-b): the union.
Expert counts per layer (`allocation`, mean E = `experts` over the L layers of a stack):
  square: E everywhere. increasing: a linear ramp from k to 2E - k (k = min(top_k, E), so
  top-k always has k experts), rounded and mirrored about the middle so the total is exactly
  L * E; decreasing: the same reversed. ViLT-B/32 (L = 12), E = 5, k = 2, increasing:
  2 3 3 4 4 5 5 6 6 7 7 8.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from delo_dist.models.method import Method

_LAYER = r"(?P<stack>.*?)(?P<layer>layers?)\.(?P<index>\d+)\."
TARGET_PATTERNS = {
    "linear": re.compile(_LAYER + r"(intermediate\.dense|output\.dense|mlp\.fc1|mlp\.fc2)$"),
    "attention": re.compile(_LAYER + r"(attention\.attention\.(query|key|value)"
                                     r"|self_attn\.(q|k|v)_proj)$"),
}


def expert_counts(allocation: str, layers: int, experts: int, top_k: int) -> list[int]:
    """Experts per layer, input side first; the mean is exactly `experts`."""
    if allocation == "square" or layers == 1:
        return [experts] * layers
    lo = min(top_k, experts)
    hi = 2 * experts - lo
    ramp = [lo + (hi - lo) * i / (layers - 1) for i in range(layers)]
    low_half = [math.floor(v + 0.5) for v in ramp[:layers // 2]]
    counts = low_half + [experts] * (layers % 2) + [2 * experts - c for c in reversed(low_half)]
    return counts if allocation == "increasing" else counts[::-1]


def mail_targets(backbone: nn.Module, cfg) -> dict[str, int]:
    """{qualified linear name: experts} for the variant's linears of the backbone."""
    kinds = ["linear", "attention"] if cfg.variant == "both" else [cfg.variant]
    found: dict[str, tuple[str, int]] = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for kind in kinds:
            m = TARGET_PATTERNS[kind].search(name)
            if m:
                found[name] = (m["stack"], int(m["index"]))
    if not found:
        raise ValueError(f"method.mail.variant={cfg.variant!r}: no linear of the backbone matches "
                         f"{[TARGET_PATTERNS[k].pattern for k in kinds]}")
    depth: dict[str, int] = defaultdict(int)  # layers per stack (CLIP has two encoders)
    for stack, index in found.values():
        depth[stack] = max(depth[stack], index + 1)
    counts = {s: expert_counts(cfg.allocation, L, cfg.experts, cfg.top_k) for s, L in depth.items()}
    return {name: counts[stack][index] for name, (stack, index) in found.items()}


class MailSession(nn.Module):
    """One mixture of LoRA experts around one linear (one session's, or the shared one)."""

    def __init__(self, d_in: int, d_out: int, cfg, experts: int):
        super().__init__()
        self.experts, self.rank = experts, cfg.rank
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.top_k = min(cfg.top_k, experts) if cfg.routing == "top_k" else None
        self.per_token = cfg.router_input == "token"
        # the wrapper gives a per-sample router the sequence mean only (no modality queries,
        # which a two-encoder backbone sizes for its attention linears); per token: nothing
        self.uses_queries = "sequence" if not self.per_token else False
        # A Gaussian (std 1 / sqrt(d_in), see the module docstring), B zero: each expert's
        # update, and so the adapted model, starts at exactly 0 (tests/test_init_identity.py)
        self.A = nn.Parameter(torch.randn(experts * cfg.rank, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out, experts * cfg.rank))
        self.router = nn.Linear(d_in, experts, bias=False)   # W_r of Eq. 6
        self.track_balance = cfg.balance > 0
        self.balance_loss: torch.Tensor | None = None          # set by each training forward

    def gates(self, x: torch.Tensor, q_all: torch.Tensor | None) -> torch.Tensor:
        """(B, E) per sample, or (B, N, E) per token; rows sum to 1 (forward values)."""
        p = self.router(x if self.per_token else q_all).softmax(-1)
        if self.top_k is None:
            g, slots = p, p                                          # every expert, weighted
        else:
            top = p.topk(self.top_k, dim=-1)
            if self.top_k == 1:  # p / p == 1 has no gradient: straight-through (docstring)
                kept = top.values - top.values.detach() + 1.0
            else:
                kept = top.values / top.values.sum(-1, keepdim=True)
            g = torch.zeros_like(p).scatter(-1, top.indices, kept)
            slots = torch.zeros_like(p).scatter(-1, top.indices, 1.0 / self.top_k)
        if self.track_balance and torch.is_grad_enabled():
            self.balance_loss = load_balance(p.reshape(-1, self.experts),
                                             slots.reshape(-1, self.experts))
        return g

    def delta(self, x, q_v=None, q_t=None, q_all=None, naive: bool = False):
        g = self.gates(x, q_all)
        if not self.per_token:
            g = g[:, None, :]                                        # (B, 1, E)
        h = F.dropout(x, self.dropout, training=torch.is_grad_enabled())
        if naive:  # benchmark only: the d_out x d_in update per routed unit, materialised
            dw = torch.einsum("oer,bne,erd->bnod", self.B.view(-1, self.experts, self.rank), g,
                              self.A.view(self.experts, self.rank, -1))
            return self.scaling * torch.einsum("bnd,bnod->bno", h, dw)
        z = h @ self.A.t()                                           # (B, N, E r)
        z = z * g.repeat_interleave(self.rank, dim=-1)               # expert e's r columns * g_e
        return self.scaling * (z @ self.B.t())


def load_balance(p: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e over routed units: p (U, E) router probabilities, slots (U, E) each
    unit's share of its routing given to expert e (rows sum to 1). f_e = mean slot share,
    P_e = mean probability; 1 when balanced, larger as routing concentrates. Top-k:
    slots are 1/k on the chosen experts (constant: the gradient flows through P, as in the
    Switch Transformer); soft merge: slots = p, so the loss is E * sum_e P_e^2."""
    experts = p.shape[-1]
    return experts * (slots.mean(0) * p.mean(0)).sum()


@dataclass
class MailSettings:
    """method.mail.* (also seq_mail's): the paper's design space; see the module docstring."""
    variant: Literal["linear", "attention", "both"] = "both"   # MAIL-l, MAIL-a, MAIL-b
    experts: int = 5                        # mean experts per adapted linear
    rank: int = 4
    alpha: float = 8.0                      # update scaled by alpha / rank
    dropout: float = 0.05                   # LoRA dropout on the expert input
    routing: Literal["top_k", "soft_merge"] = "top_k"
    top_k: int = 2
    allocation: Literal["square", "increasing", "decreasing"] = "square"
    router_input: Literal["sample", "token"] = "sample"   # the paper is silent: see above
    balance: float = 0.0                    # load-balancing loss weight (the paper has none)
    # a missing image: zeros after normalisation, as the paper's example (DeLo and MoRA keep
    # their backbone's convention); a missing text is the empty string for every method
    dummy_image: Literal["zeros", "ones", "white", "backbone"] = "zeros"

    def validate(self, check) -> None:
        check(self.experts >= 1, "experts", "an int >= 1", self.experts)
        check(self.rank >= 1, "rank", "an int >= 1", self.rank)
        check(1 <= self.top_k <= self.experts, "top_k", f"an int in [1, experts={self.experts}]",
              self.top_k)
        check(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        check(self.balance >= 0, "balance", "a non-negative weight", self.balance)


class Mail(Method):
    """MAIL: one mixture of LoRA experts per session around the variant's linears, chosen at
    inference by the task identifier."""
    name = "mail"
    Settings = MailSettings
    bench = {"method.mail.experts": 5}

    def describe(self) -> str:
        c = self.cfg
        k = c.top_k if c.routing == "top_k" else "soft"
        return f"MAIL-{c.variant[0]}, E={c.experts} ({c.allocation}), r={c.rank}, top-{k}"

    def select_linears(self, backbone, targets):
        """The variant decides the linears (backbone.targets is not used), each with its
        layer's expert count."""
        self._experts = mail_targets(backbone, self.cfg)
        return backbone.adapted_linears(list(self._experts))

    def make_session(self, d_in, d_out, *, name, **_):
        return MailSession(d_in, d_out, self.cfg, self._experts[name])

    def loss_terms(self, model, batch, out, session):
        if self.cfg.balance <= 0:
            return {}
        balance = balance_loss(model, session)
        return {} if balance is None else {"balance": (self.cfg.balance, balance)}


class SeqMail(Mail):
    """One MAIL mixture fine-tuned session after session (a new head per session)."""
    name = "seq_mail"
    section = "mail"
    shared_across_sessions = True
    bench = None  # costs what mail costs: the same mixture under every session's name


def balance_loss(model, k: int) -> torch.Tensor | None:
    """Mean load-balancing loss of session k's mixtures in the last training forward (read
    once: the stored values are cleared)."""
    losses = []
    for adapted in model.adapted:
        s = adapted.session_module(k)
        if isinstance(s, MailSession) and s.balance_loss is not None:
            losses.append(s.balance_loss)
            s.balance_loss = None
    return torch.stack(losses).mean() if losses else None
