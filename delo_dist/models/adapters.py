"""Session-partitioned adapters around frozen linears, and the routing context they read.

`AdaptedLinear` keeps the frozen `base` linear and one adapter module per session in a
ModuleDict (the PEFT pattern, keyed by session). Per forward it:
  1. computes each sample's modality queries q_v, q_t = mean of that modality's tokens in
     its input (the backbone marked the tokens in the context), once per layer input;
  2. applies the cross-modal guide: a sample missing its text routes the text pool with q_v,
     one missing its image routes the visual pool with q_t (and the consistency loss can ask
     for the same substitution on complete samples through `ctx.proxy`);
  3. adds the delta of the session each sample is routed to (per sample: one batch may mix
     sessions at inference).
Session modules implement `delta(x, q_v, q_t, q_all) -> (B, N, d_out)`.

Two-encoder backbones (CLIP): an encoder's sequence holds one modality. The backbone marks
that modality's tokens and leaves the other mask None, giving the other modality's query
from outside instead (`ctx.text_query` / `ctx.image_query`, already in this width).
Methods that merge their update into the weights (MoRA) run merged through `ctx.merged`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

PROXY_NONE, PROXY_TEXT, PROXY_IMAGE = 0, 1, 2


@dataclass
class RoutingContext:
    enabled: bool = True                          # False: the frozen backbone alone
    text_tokens: Optional[torch.Tensor] = None    # (B, N) bool, set by the backbone
    image_tokens: Optional[torch.Tensor] = None
    missing_text: Optional[torch.Tensor] = None   # (B,) bool
    missing_image: Optional[torch.Tensor] = None
    session: Optional[torch.Tensor] = None        # (B,) long: adapters each sample uses
    uniform_session: Optional[int] = None         # all samples on one session (training)
    proxy: Optional[torch.Tensor] = None          # (B,) PROXY_*: simulate a missing modality
    cross_modal_guide: bool = True
    record: bool = False
    queries: list = field(default_factory=list)   # (q_v, q_t) per adapted linear, if record
    naive: bool = False                           # benchmark only: materialise per-sample dW
    cached_input: Optional[torch.Tensor] = None   # query, key and value share one input:
    cached_queries: Optional[tuple] = None        # their modality means are computed once
    cached_routes: Optional[tuple] = None         # (input, routing queries), also once per input
    session_groups: Optional[list] = None         # [(k, sample indices)], once per forward
    text_query: Optional[torch.Tensor] = None     # (B, d_in): given when the sequence has no
    image_query: Optional[torch.Tensor] = None    # tokens of that modality (two encoders)
    merged: Optional[int] = None                  # all samples on this session, run merged
    prompts: Optional[object] = None              # prompts.Prompts for one forward (None: off)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def modality_queries(ctx: RoutingContext, x: torch.Tensor):
    """(q_v, q_t, q_all) for a layer input, once per input tensor: the linears that share it
    (query, key, value) reuse the result, and only its first computation is recorded."""
    if ctx.cached_input is x:
        return ctx.cached_queries
    if ctx.text_tokens is None or ctx.image_tokens is None:
        queries = encoder_queries(ctx, x)
        ctx.cached_input, ctx.cached_queries = x, queries
        if ctx.record:
            ctx.queries.append(queries[:2])
        return queries
    m_v, m_t = ctx.image_tokens.to(x.dtype), ctx.text_tokens.to(x.dtype)   # (B, N)
    s_v, s_t = torch.einsum("bn,bnd->bd", m_v, x), torch.einsum("bn,bnd->bd", m_t, x)
    n_v, n_t = m_v.sum(1, keepdim=True), m_t.sum(1, keepdim=True)
    queries = (s_v / n_v.clamp(min=1.0), s_t / n_t.clamp(min=1.0),
               (s_v + s_t) / (n_v + n_t).clamp(min=1.0))
    ctx.cached_input, ctx.cached_queries = x, queries
    if ctx.record:
        ctx.queries.append(queries[:2])
    return queries


def sequence_query(ctx: RoutingContext, x: torch.Tensor) -> torch.Tensor:
    """(B, d_in) mean of the sequence's real tokens (both modalities' on ViLT, its own
    encoder's on CLIP): what modality_queries returns as q_all, for any linear width."""
    masks = [m for m in (ctx.text_tokens, ctx.image_tokens) if m is not None]
    return masked_mean(x, masks[0] if len(masks) == 1 else masks[0] | masks[1])


def encoder_queries(ctx: RoutingContext, x: torch.Tensor):
    """(q_v, q_t, q_all) inside one encoder of a two-encoder backbone: its own modality's
    token mean, the other modality's query as given; q_all is this sequence's own mean."""
    if ctx.image_tokens is not None:
        q_v = masked_mean(x, ctx.image_tokens)
        return q_v, ctx.text_query.to(x.dtype), q_v
    q_t = masked_mean(x, ctx.text_tokens)
    return ctx.image_query.to(x.dtype), q_t, q_t


def routing_queries(ctx: RoutingContext, q_v: torch.Tensor, q_t: torch.Tensor):
    """The queries each pool is routed with, after the cross-modal guide (Eq. 5)."""
    no_text, no_image = ctx.missing_text, ctx.missing_image
    if ctx.proxy is not None:
        no_text = no_text | (ctx.proxy == PROXY_TEXT)
        no_image = no_image | (ctx.proxy == PROXY_IMAGE)
    if not ctx.cross_modal_guide:
        return q_v, q_t  # ablation: the dummy input's own query
    route_t = torch.where(no_text.unsqueeze(-1), q_v, q_t)
    route_v = torch.where(no_image.unsqueeze(-1), q_t, q_v)
    return route_v, route_t


def layer_routes(ctx: RoutingContext, x: torch.Tensor):
    """(route_v, route_t, q_all) for a layer input: computed by the first linear that reads
    it, reused by the others (query, key and value share their input)."""
    if ctx.cached_routes is not None and ctx.cached_routes[0] is x:
        return ctx.cached_routes[1]
    q_v, q_t, q_all = modality_queries(ctx, x)
    routes = (*routing_queries(ctx, q_v, q_t), q_all)
    ctx.cached_routes = (x, routes)
    return routes


def session_groups(ctx: RoutingContext) -> list:
    """[(session, sample indices)] over the sessions present in the batch only: the cost of a
    mixed batch grows with the sessions it routes to, not with the sessions trained."""
    if ctx.session_groups is None:
        ctx.session_groups = [(k, (ctx.session == k).nonzero().squeeze(1))
                              for k in ctx.session.unique().tolist()]
    return ctx.session_groups


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, ctx: RoutingContext,
                 make_session: Callable[[str], nn.Module], session_names: list[str]):
        """make_session(name) builds the adapter of the session (or shared module) `name`;
        session_names[k] names session k's (the same name for every session: seq_*)."""
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.sessions = nn.ModuleDict({name: make_session(name)
                                       for name in dict.fromkeys(session_names)})
        self.session_names = session_names  # session index -> module name (shared for seq LoRA)

    def session_module(self, k: int) -> nn.Module:
        return self.sessions[self.session_names[k]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.merged is not None and ctx.enabled:  # one session, its update in the weight
            return self.session_module(ctx.merged).merged_forward(self.base, x)
        y = self.base(x)
        if not ctx.enabled:
            return y
        uses = getattr(self.sessions[self.session_names[0]], "uses_queries", True)
        if not uses:
            return y + self._per_session(x, y, None, None, None)  # static LoRA: no routing
        if uses == "sequence":  # routers that read the sequence mean only (MAIL)
            return y + self._per_session(x, y, None, None, sequence_query(ctx, x))
        return y + self._per_session(x, y, *layer_routes(ctx, x))

    def _delta(self, k: int, *args):
        module = self.session_module(k)
        return module.delta(*args, naive=True) if self.ctx.naive else module.delta(*args)

    def _per_session(self, x, y, route_v, route_t, q_all):
        """Each sample gets the delta of its own session (one call when all agree)."""
        ctx = self.ctx
        if ctx.uniform_session is not None:
            return self._delta(ctx.uniform_session, x, route_v, route_t, q_all)
        pick = lambda t, idx: None if t is None else t[idx]  # noqa: E731
        delta = torch.zeros_like(y)
        for k, idx in session_groups(ctx):
            d = self._delta(k, x[idx], pick(route_v, idx), pick(route_t, idx), pick(q_all, idx))
            delta = delta.index_add(0, idx, d)
        return delta
