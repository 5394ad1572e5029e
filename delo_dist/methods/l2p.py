"""L2P: Learning to Prompt ("Learning to Prompt for Continual Learning", Wang et al., CVPR 2022,
arXiv 2112.08654; read: its PyTorch port JH-LEE-KR/l2p-pytorch and GT-RIPL/CODA-Prompt's zoo).

A pool of M prompts (each L rows) with learnable keys; every sample picks the N prompts whose
keys have the largest cosine with its query (the frozen backbone's [CLS]), and the N * L rows
are prepended as input tokens at layer 0 (prompt tuning). Training adds the surrogate loss
lambda * mean_b sum_{chosen i} (1 - cos(q_b, k_i)), which pulls the chosen keys to the query
(only the keys get its gradient; the choice itself is a hard top-N).
Forward: frozen query pass -> top-N prompts -> prompted pass -> the shared head. The frozen
query pass is a full forward of the backbone without prompts (no backward): at training and at
inference L2P costs about one forward more than a prompt-free method.

Defaults (the paper's, as its PyTorch port configures them): pool 10, length 5, top-N 5, layer 0, input position,
lambda 0.1, keys and prompts uniform in [0, 1), query "cls".
Our choices: selection is per sample at inference too (the code's `batchwise_prompt`
majority vote over a test batch assumes one task per batch: google-research/l2p#28);
the head reads the backbone's pooled feature (the code's head reads the mean of the prompt
tokens' outputs; here the shared head is the integrator's, the same for every method).
`position: prefix` is offered (each prompt then holds L key rows and L value rows, prepended
at the `layers`), as CODA-Prompt's zoo runs "L2P++"; `layers` may list more layers (the same
chosen ids at each).

Shared across sessions: the whole pool (keys and prompts), trained in every session as the
paper does; nothing is per session. session_parameters(k) is the pool for every k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from delo_dist.methods.prompt_pools import (KeyedPool, PromptOutput, PromptSet, check_choice,
                                            check_layers, query_name, select_sites, site_name)
from delo_dist.methods.prompting import PromptMethod, layer_list


@dataclass
class L2PSettings:
    pool_size: int = 10
    length: int = 5
    top_n: int = 5
    layers: list[int] = field(default_factory=lambda: [0])
    position: str = "input"          # input | prefix
    key_weight: float = 0.1          # lambda of the surrogate key-matching loss
    query: str = "cls"               # frozen_query entry matched with the keys

    def validate(self, check) -> None:
        check(self.pool_size >= 1, "pool_size", "an int >= 1", self.pool_size)
        check(self.length >= 1, "length", "an int >= 1", self.length)
        check(1 <= self.top_n <= self.pool_size, "top_n", f"an int in [1, pool_size={self.pool_size}]",
              self.top_n)
        check_layers(check, "layers", self.layers)
        check_choice(check, "position", self.position, ("input", "prefix"))
        check(self.key_weight >= 0, "key_weight", "a non-negative weight", self.key_weight)


class L2P(nn.Module):
    def __init__(self, cfg: L2PSettings, sites, query_dims: dict, sessions: int = 1):
        super().__init__()
        self.cfg = cfg
        self.query = query_name(query_dims, cfg.query, "query")
        self.sites = select_sites(sites, cfg.layers, "layers")
        rows = cfg.length * (2 if cfg.position == "prefix" else 1)   # prefix: L keys, then L values
        self.pool = KeyedPool(cfg.pool_size, query_dims[self.query], rows, self.sites)

    def start_session(self, k: int) -> None:
        pass

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return list(self.pool.parameters())

    def forward(self, query, missing_text, missing_image, session=None, task_ids=None,
                seen=None) -> PromptOutput:
        idx, key_loss = self.pool.select(query[self.query], self.cfg.top_n)     # (B, N)
        out = PromptSet()
        for e, l, _ in self.sites:
            rows = self.pool.gather(site_name(e, l), idx)                         # (B, N rows, d)
            if self.cfg.position == "input":
                out.add_input((e, l), rows)
            else:   # each chosen prompt: L key rows then L value rows
                p = rows.unflatten(1, (self.cfg.top_n, 2, self.cfg.length))
                out.add_prefix((e, l), p[:, :, 0].flatten(1, 2), p[:, :, 1].flatten(1, 2))
        losses = {"l2p_key": (self.cfg.key_weight, key_loss)} if session is not None else {}
        return PromptOutput(out.build(), losses, extras={"prompt_idx": idx})


class L2PMethod(PromptMethod):
    """L2P as a plug-in: top-N prompts of one shared pool chosen by the frozen [CLS] query."""
    name = "l2p"
    Settings = L2PSettings
    Module = L2P

    def describe(self) -> str:
        c = self.cfg
        return (f"pool {c.pool_size} x length {c.length}, top-{c.top_n}, {c.position} at layers "
                f"{layer_list(c.layers)}, shared by all sessions")
