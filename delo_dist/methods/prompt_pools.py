"""Shared pieces of the prompt methods (MAP, MSP, L2P, DualPrompt, CODA-Prompt, RebQ).

What every method module here holds, so that wrapping it into a `Method` plug-in is small:
  - `<Name>Settings`: a dataclass with the paper's defaults and `validate(check)`, where
    `check(cond, key, expected, got)` reports a bad value of field `key` of the method's
    recipe section `method.<section>` (the wrapper adds the section to the key);
  - `<Name>`, an nn.Module built from (settings, sites, query_dims, sessions):
      sites       `backbone.prompt_sites()`: [(encoder, layer, width)], encoder "joint" (ViLT)
                  or "text" / "image" (CLIP's two encoders);
      query_dims  {name: width} of what `backbone.frozen_query(batch)` returns
                  (`backbone.frozen_query_dims()`; ViLT: "cls", "text_cls", "image_cls";
                  CLIP: "image", "text", "cls");
      sessions    how many sessions the run has (CODA-Prompt and RebQ split their pool by it);
    start_session(k)      session k's parts: created if they do not exist yet (call 0, 1, 2, ...
                          in order; the plug-in creates every session's at build, so that a
                          checkpoint loads by name), else re-initialised from the trained
                          earlier sessions' (CODA-Prompt, RebQ: orthogonal to the earlier
                          slices; the others have nothing to redo);
    session_parameters(k) exactly what trains in session k: its own parts and what the
                          method shares (earlier sessions' parts never);
    forward(query, missing_text, missing_image, session=None, task_ids=None, seen=None, ...)
                          -> PromptOutput. session=k: the training forward of session k (loss
                          terms computed, earlier sessions' parts detached, later ones unused);
                          session=None: inference over the first `seen` sessions (None: every
                          session built).
  Layer lists in the settings count per encoder (CLIP: the same layers of both encoders); a
  layer the backbone lacks is an error naming the key.

Contract with the backbone hooks (delo_dist/models/prompts.py):
  Prompts(input={(encoder, layer): (B, P, d)}, prefix={(encoder, layer): (keys (B, P, d),
  values (B, P, d))}, input_mask / prefix_mask {site: (B, P) bool}) for one prompted forward.
  Input tokens are inserted after the first token at that layer and stay until the encoder's
  end (removed before pooling; `replace_input`: a layer's replace the earlier ones); prefix
  rows are prepended to that layer's self-attention keys and values in hidden width (after
  the key/value projections, as prefix tuning and the MAP, CODA-Prompt and RebQ codes do); a
  row a mask marks absent is left out of attention. Prompts are float32 parameters: the hook
  casts them to the activations' dtype.

Pools:
  KeyedPool (L2P): M prompts with learnable keys, top-N chosen per sample by the cosine of
    the frozen query with the keys; a surrogate loss pulls the chosen keys to the query.
  ComponentPool (CODA-Prompt, RebQ; one per prompted layer, as in CODA-Prompt): per session
    a slice of n components, each a key K_i, an attention vector A_i (query width) and a
    prompt P_i (L, d); weights a_i = cos(q * A_i, K_i), prompt = sum_i a_i P_i. Every slice
    is its own tensor; a slice starts orthonormal and orthogonal to the earlier slices
    (Gram-Schmidt through QR, on K, A and the flattened P separately), and is drawn again,
    orthogonal to the trained earlier slices, when its session starts; in session k's
    training forward the earlier slices are detached.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Site = tuple[str, int, int]          # (encoder, layer, width)
Check = Callable[[bool, str, str, Any], None]


@dataclass
class PromptOutput:
    prompts: Any                                   # a Prompts for the prompted pass
    losses: dict = field(default_factory=dict)     # {name: (weight, scalar tensor)}
    routed: Optional[torch.Tensor] = None          # (B,) session chosen per sample; None: no routing
    extras: dict = field(default_factory=dict)     # analysis only (L2P's chosen prompt ids, ...)


def site_name(encoder: str, layer: int) -> str:
    """Parameter-dict name of a site ('.' is not allowed in module names)."""
    return f"{encoder}_{layer}"


def select_sites(sites: list[Site], layers: list[int], key: str) -> list[Site]:
    """The sites at `layers` of every encoder, encoder by encoder; a missing layer is an error
    naming the settings key."""
    depth: dict[str, int] = {}
    for encoder, layer, _ in sites:
        depth[encoder] = max(depth.get(encoder, 0), layer + 1)
    for encoder, n in depth.items():
        bad = [l for l in layers if not 0 <= l < n]
        if bad:
            raise ValueError(f"key '{key}': layers {bad} are not layers of encoder '{encoder}' "
                             f"(it has layers 0..{n - 1})")
    wanted = set(layers)
    return [s for s in sites if s[1] in wanted]


def split_half(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d) prompt rows -> prefix (keys: the first L/2 rows, values: the last L/2)."""
    h = p.shape[1] // 2
    return p[:, :h], p[:, h:]


def build_prompts(input: dict, prefix: dict, input_mask: Optional[dict] = None,
                  prefix_mask: Optional[dict] = None, replace_input: bool = False):
    """The hooks' Prompts for one forward; per-row masks ({site: (B, P) bool}, True = the row is
    there) only where rows were dropped (MSP's missing modality)."""
    from delo_dist.models.prompts import Prompts   # the hooks' class, imported when used
    return Prompts(input=input, prefix=prefix, input_mask=input_mask or {},
                   prefix_mask=prefix_mask or {}, replace_input=replace_input)


class PromptSet:
    """Collects one forward's prompts; several sources at one site are concatenated (in the
    order added), with a per-row mask where some source gave one."""

    def __init__(self):
        self.input: dict = defaultdict(list)     # site -> [(rows (B, P, d), mask (B, P) or None)]
        self.prefix: dict = defaultdict(list)    # site -> [(keys, values, mask or None)]

    def add_input(self, site: tuple[str, int], x: torch.Tensor, mask=None) -> None:
        self.input[site].append((x, mask))

    def add_prefix(self, site: tuple[str, int], k: torch.Tensor, v: torch.Tensor, mask=None) -> None:
        self.prefix[site].append((k, v, mask))

    def add(self, site: tuple[str, int], rows: torch.Tensor, position: str, mask=None) -> None:
        """rows (B, L, d): input tokens, or split in half into prefix keys and values."""
        if position == "input":
            self.add_input(site, rows, mask)
        else:
            k, v = split_half(rows)
            self.add_prefix(site, k, v, None if mask is None else mask[:, : k.shape[1]])

    def build(self, replace_input: bool = False):
        """The Prompts; replace_input: each layer's input prompts replace the earlier ones."""
        input = {s: torch.cat([x for x, _ in parts], 1) for s, parts in self.input.items()}
        prefix = {s: (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
                  for s, parts in self.prefix.items()}
        input_mask = {s: _row_mask([(x, m) for x, m in parts])
                      for s, parts in self.input.items() if any(m is not None for _, m in parts)}
        prefix_mask = {s: _row_mask([(k, m) for k, _, m in parts])
                       for s, parts in self.prefix.items() if any(p[2] is not None for p in parts)}
        return build_prompts(input, prefix, input_mask, prefix_mask, replace_input)


def _row_mask(parts: list) -> torch.Tensor:
    """(B, P) of concatenated rows; rows that came without a mask are all there."""
    return torch.cat([m if m is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                      for x, m in parts], 1)


def cosine_matrix(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, d), (M, d) -> (B, M) cosine similarities."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """CODA-Prompt's || X X^T - I ||^2, averaged over the entries: X (n, D) rows."""
    eye = torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return ((x @ x.t() - eye) ** 2).mean()


def orthogonal_rows(n: int, dim: int, earlier: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n unit rows of width dim, orthogonal to each other and to every row of `earlier`
    ((m, dim)): random normal rows, the span of the earlier rows projected out, then QR.
    Where m + n > dim that cannot hold: the rows are then orthonormal inside what is left
    (or, if n > dim, only unit-norm), with a warning."""
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    m = 0 if earlier is None else earlier.shape[0]
    if m + n > dim:
        warnings.warn(f"{m} earlier + {n} new components do not fit orthogonally in width {dim}: "
                      "the new ones are only as orthogonal as the width allows", stacklevel=3)
    if m and m < dim:
        basis, _ = torch.linalg.qr(earlier.detach().to(torch.float64).t())      # (dim, m)
        x = x - (x @ basis) @ basis.t()
    if n <= dim:
        q, _ = torch.linalg.qr(x.t())                                            # (dim, n)
        x = q.t()
    return F.normalize(x, dim=-1).to(torch.float32)


def uniform_(t: torch.Tensor) -> torch.Tensor:
    """The L2P / DualPrompt codes' prompt and key init: uniform in [0, 1)."""
    return nn.init.uniform_(t)


class KeyedPool(nn.Module):
    """L2P's prompt pool: keys (M, d_q) and, per site, prompts (M, rows, d_site); selection is
    shared by the sites (one choice per sample, its prompts at every prompted layer)."""

    def __init__(self, size: int, key_dim: int, rows: int, sites: list[Site]):
        super().__init__()
        self.keys = nn.Parameter(uniform_(torch.empty(size, key_dim)))
        self.prompts = nn.ParameterDict({site_name(e, l): nn.Parameter(uniform_(torch.empty(size, rows, w)))
                                         for e, l, w in sites})

    def select(self, q: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, top_n) prompt ids with the largest cosine to the query, and the surrogate
        loss mean_b sum_n (1 - cos(q_b, k_{id_bn})) (L2P Eq. 5's matching term; only the keys
        get its gradient: the query is frozen)."""
        sim = cosine_matrix(q.detach().to(self.keys.dtype), self.keys)   # (B, M)
        idx = sim.topk(top_n, dim=1).indices                         # (B, N)
        loss = (1.0 - sim.gather(1, idx)).sum(1).mean()
        return idx, loss

    def gather(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """(B, N) ids -> (B, N * rows, d): the chosen prompts one after the other."""
        return self.prompts[name][idx].flatten(1, 2)


class ComponentPool(nn.Module):
    """One layer's CODA-Prompt pool: per session a slice of n components, each slice its own
    tensors K (n, d_q), A (n, d_q), P (n, L, d)."""

    def __init__(self, per_session: int, key_dim: int, length: int, width: int):
        super().__init__()
        self.n, self.key_dim, self.length, self.width = per_session, key_dim, length, width
        self.K, self.A, self.P = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # where new slices go

    @property
    def sessions(self) -> int:
        return len(self.K)

    def add_session(self) -> None:
        """Session len(self.K)'s slice, orthonormal and orthogonal to the earlier slices."""
        dev = self.anchor.device
        self.K.append(nn.Parameter(torch.empty(self.n, self.key_dim, device=dev)))
        self.A.append(nn.Parameter(torch.empty(self.n, self.key_dim, device=dev)))
        self.P.append(nn.Parameter(torch.empty(self.n, self.length, self.width, device=dev)))
        self.init_slice(self.sessions - 1)

    @torch.no_grad()
    def init_slice(self, k: int) -> None:
        """Draw slice k again: orthonormal rows orthogonal to slices 0..k-1 as they are now
        (trained), on K, A and the flattened P separately (from the global RNG)."""
        for params in (self.K, self.A, self.P):
            earlier = [p.detach().reshape(self.n, -1) for p in params[:k]]
            flat = torch.cat(earlier) if earlier else None
            rows = orthogonal_rows(self.n, params[k][0].numel(), flat)
            params[k].copy_(rows.reshape(params[k].shape))

    def stacked(self, session: Optional[int], seen: Optional[int] = None):
        """K, A, P over the slices a forward uses: session k's training forward, slices 0..k
        with 0..k-1 detached; inference (None), the first `seen` slices (None: every one)."""
        last = session if session is not None else (self.sessions if seen is None else seen) - 1
        if not 0 <= last < self.sessions:
            raise RuntimeError(f"session {last} has no pool slice: call start_session({last}) first")
        def cat(params):
            return torch.cat([p if session is None or i == session else p.detach()
                              for i, p in enumerate(params[: last + 1])])
        return cat(self.K), cat(self.A), cat(self.P)

    def forward(self, q, session: Optional[int], penalty: bool = False,
                seen: Optional[int] = None):
        """q (B, d_q) -> the prompt (B, L, d), and (if asked) the orthogonality penalty of K, A
        and the flattened P (as CODA-Prompt's: earlier slices enter detached), else None.
        q a tuple of queries -> a tuple of their prompts (the slices stacked once)."""
        K, A, P = self.stacked(session, seen)
        prompt = (tuple(self._prompt(x, K, A, P) for x in q) if isinstance(q, tuple)
                  else self._prompt(q, K, A, P))
        if not penalty:
            return prompt, None
        return prompt, ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.flatten(1))

    @staticmethod
    def _prompt(q: torch.Tensor, K: torch.Tensor, A: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        q = q.to(A.dtype)                                             # a bf16 query pass, fp32 pool
        aq = F.normalize(q.unsqueeze(1) * A.unsqueeze(0), dim=-1)    # (B, c, d_q)
        w = torch.einsum("bcd,cd->bc", aq, F.normalize(K, dim=-1))    # (B, c) in [-1, 1]
        return torch.einsum("bc,cld->bld", w, P)                       # (B, L, d)

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return [self.K[k], self.A[k], self.P[k]]


def start_pools(pools: list, k: int) -> None:
    """start_session(k) of a module made of ComponentPools: create slice k (in order), or draw
    it again orthogonal to the trained earlier slices."""
    have = pools[0].sessions
    if k > have:
        raise RuntimeError(f"start_session({k}) after {have} sessions: call them in order")
    for pool in pools:
        pool.add_session() if k == have else pool.init_slice(k)


def check_layers(check: Check, key: str, layers: list[int]) -> None:
    check(len(layers) >= 1 and all(isinstance(l, int) and l >= 0 for l in layers)
          and len(set(layers)) == len(layers), key, "a non-empty list of distinct layer indices >= 0",
          layers)


def check_choice(check: Check, key: str, value: str, choices: tuple) -> None:
    check(value in choices, key, f"one of {list(choices)}", value)


def check_prefix_length(check: Check, key: str, length: int, position: str) -> None:
    """In prefix position a prompt's rows split in half (keys, values): `length` must be even."""
    check(position == "input" or length % 2 == 0, key,
          "an even number in prefix position (half keys, half values)", length)


def per_session(pool_size: int, sessions: int, key: str = "pool_size") -> int:
    """Components per session's slice when `pool_size` are split over `sessions`."""
    n = pool_size // max(sessions, 1)
    if n < 1:
        raise ValueError(f"key '{key}': {pool_size} components cannot be split over {sessions} sessions")
    return n


def query_name(query_dims: dict, want: str, key: str) -> str:
    """The frozen-query entry a method reads; an error names the key and what exists."""
    if want not in query_dims:
        raise ValueError(f"key '{key}': the backbone's frozen query has no '{want}' "
                         f"(it has {sorted(query_dims)})")
    return want


def modality_queries(query_dims: dict) -> tuple[str, str]:
    """(text, image) entry names of the frozen query: ViLT's final [CLS] of the text part and
    first image token ("text_cls", "image_cls"), else CLIP's two encoders' ("text", "image")."""
    if "text_cls" in query_dims and "image_cls" in query_dims:
        return "text_cls", "image_cls"
    if "text" in query_dims and "image" in query_dims:
        return "text", "image"
    raise ValueError(f"the backbone's frozen query has no per-modality entries (it has {sorted(query_dims)})")
