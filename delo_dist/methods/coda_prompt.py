"""CODA-Prompt ("CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", Smith et al., CVPR 2023, arXiv 2211.13218; read: GT-RIPL/CODA-Prompt
models/zoo.py).

At each prompted layer a pool of prompt components, each with a key K_i and an attention
vector A_i; a sample's prompt is the weighted sum sum_i a_i P_i with a_i = cos(q * A_i, K_i),
q the frozen backbone's [CLS]. Everything is differentiable (no top-k), so keys, attention
vectors and components train end to end with the classification loss. Prefix tuning: the
prompt's L rows split in half into key and value rows.
Forward: frozen query pass -> weighted components -> prompted pass -> the shared head. The
frozen query pass is one more prompt-free forward at training and at inference; no routing.

Continual: the pool grows by a slice of pool_size / sessions components per session (the code:
100 over 10 tasks, 10 a task). Every slice exists from the start (a checkpoint loads by name);
session k's is drawn again at start_session(k), orthonormal and orthogonal to the trained
earlier slices (Gram-Schmidt on K, A and the flattened P separately, as the code
re-initialises a task's new components); in session k's training forward the earlier slices
take part detached (their components still shape the prompt, but get no gradient), later ones
not at all, and inference uses the slices of the sessions seen so far. The orthogonality loss
ortho_weight * sum_layers (||K K^T - I||^2 + ||A A^T - I||^2 + ||P P^T - I||^2) (entry
means; earlier rows enter detached) keeps the new slice orthogonal while it trains.

Defaults: pool 100, length 8, layers 0-4, prefix position, query "cls" (the code's
configs). `ortho_weight` 0.1 is our choice: the code's published runs pass 0.0 (relying on
the orthogonal init) and we could not read the paper's value; 0 gives the code's runs.

Per session: each layer's slice k (K, A, P), separate tensors. Shared: nothing (the shared
head is the integrator's). session_parameters(k): slice k of every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from delo_dist.methods.prompt_pools import (ComponentPool, PromptOutput, PromptSet, check_choice,
                                            check_layers, check_prefix_length, per_session,
                                            query_name, select_sites, site_name, start_pools)
from delo_dist.methods.prompting import PromptMethod, layer_list


@dataclass
class CodaPromptSettings:
    pool_size: int = 100             # components over all sessions
    length: int = 8
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    position: str = "prefix"         # prefix | input
    ortho_weight: float = 0.1
    query: str = "cls"

    def validate(self, check) -> None:
        check(self.pool_size >= 1, "pool_size", "an int >= 1", self.pool_size)
        check(self.length >= 1, "length", "an int >= 1", self.length)
        check_layers(check, "layers", self.layers)
        check_choice(check, "position", self.position, ("prefix", "input"))
        check_prefix_length(check, "length", self.length, self.position)
        check(self.ortho_weight >= 0, "ortho_weight", "a non-negative weight", self.ortho_weight)


class CodaPrompt(nn.Module):
    def __init__(self, cfg: CodaPromptSettings, sites, query_dims: dict, sessions: int):
        super().__init__()
        self.cfg = cfg
        self.query = query_name(query_dims, cfg.query, "query")
        self.sites = select_sites(sites, cfg.layers, "layers")
        n = per_session(cfg.pool_size, sessions)
        self.pools = nn.ModuleDict({site_name(e, l): ComponentPool(n, query_dims[self.query], cfg.length, w)
                                    for e, l, w in self.sites})

    @property
    def sessions(self) -> int:
        return next(iter(self.pools.values())).sessions

    def start_session(self, k: int) -> None:
        start_pools(list(self.pools.values()), k)

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for pool in self.pools.values() for p in pool.session_parameters(k)]

    def forward(self, query, missing_text, missing_image, session=None, task_ids=None,
                seen=None) -> PromptOutput:
        q = query[self.query].detach()
        want = session is not None and self.cfg.ortho_weight > 0
        out, ortho = PromptSet(), []
        for e, l, _ in self.sites:
            prompt, penalty = self.pools[site_name(e, l)](q, session, want, seen)   # (B, L, d)
            out.add((e, l), prompt, self.cfg.position)
            ortho.append(penalty)
        losses = {"coda_ortho": (self.cfg.ortho_weight, torch.stack(ortho).sum())} if want else {}
        return PromptOutput(out.build(), losses)


class CodaPromptMethod(PromptMethod):
    """CODA-Prompt as a plug-in: a pool slice per session (separate tensors), drawn orthogonal
    to the trained earlier slices when its session starts."""
    name = "coda_prompt"
    bench = {"method.coda_prompt.layers": [0, 1]}   # 0-4 of 12 layers, at the bench's 4
    Settings = CodaPromptSettings
    Module = CodaPrompt

    def describe(self) -> str:
        c = self.cfg
        return (f"pool {c.pool_size} (a slice a session) x length {c.length}, {c.position} at "
                f"layers {layer_list(c.layers)}")
