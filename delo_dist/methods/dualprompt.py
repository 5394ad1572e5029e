"""DualPrompt ("DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning",
Wang et al., ECCV 2022, arXiv 2204.04799; read: its PyTorch port JH-LEE-KR/dualprompt-pytorch
and GT-RIPL/CODA-Prompt's zoo).

A G(eneral)-prompt shared by all sessions in the first layers, and one E(xpert)-prompt per
session with its key in the next layers, both by prefix tuning. Training session k uses
E-prompt k for every sample (the session is known) and adds the E-key matching loss
lambda * mean_b (1 - cos(q_b, key_k)), which pulls key k to its session's queries (the
frozen backbone's [CLS]). At inference each sample takes the E-prompt of the session whose
key is nearest (cosine) to its query - `routed` returns that session so routing accuracy can
be reported - or, with `routing: task_id`, the session the product's task identification
gives (`task_ids`).
Forward: frozen query pass -> E-prompt by key (or task id) -> prompted pass -> the shared
head. The frozen query pass is one more prompt-free forward at training (for the key loss) and
at inference (for the choice); with `routing: task_id` the identifier's cost replaces it.

Defaults (the paper's and its code's CIFAR-100 setting): G-prompt length 5 at layers 0-1,
E-prompt length 5 at layers 2-4, prefix position with `length` key rows and `length` value
rows (the code's prefix shape; its ImageNet-R setting uses E length 20), lambda 1.0, prompts
and keys uniform in [0, 1), query "cls". `position: input` is offered (prompt tuning: length
tokens per layer). One E-prompt per session: the pool size is the number of sessions.

Per session: E-prompt k (every E layer) and key k, separate tensors (the plug-in builds every
session's at the start, so a checkpoint loads by name; nothing of session k's is trained
before session k); other sessions' are not in session k's training forward at all, and
inference chooses among the sessions seen so far. Shared: the G-prompt, trained in every session.
session_parameters(k): the G-prompt, E-prompt k and key k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from delo_dist.methods.prompt_pools import (PromptOutput, PromptSet, check_choice, check_layers,
                                            cosine_matrix, query_name, select_sites, site_name,
                                            uniform_)
from delo_dist.methods.prompting import PromptMethod, layer_list


@dataclass
class DualPromptSettings:
    g_length: int = 5
    g_layers: list[int] = field(default_factory=lambda: [0, 1])
    e_length: int = 5
    e_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    position: str = "prefix"         # prefix | input
    key_weight: float = 1.0          # lambda of the E-key matching loss
    routing: str = "keys"            # keys (the paper's) | task_id (the product's identifier)
    query: str = "cls"

    def validate(self, check) -> None:
        check(self.g_length >= 0, "g_length", "an int >= 0 (0: no G-prompt)", self.g_length)
        check(self.e_length >= 1, "e_length", "an int >= 1", self.e_length)
        if self.g_length:
            check_layers(check, "g_layers", self.g_layers)
        check_layers(check, "e_layers", self.e_layers)
        check_choice(check, "position", self.position, ("prefix", "input"))
        check(self.key_weight >= 0, "key_weight", "a non-negative weight", self.key_weight)
        check_choice(check, "routing", self.routing, ("keys", "task_id"))


class DualPrompt(nn.Module):
    def __init__(self, cfg: DualPromptSettings, sites, query_dims: dict, sessions: int = 1):
        super().__init__()
        self.cfg = cfg
        self.query = query_name(query_dims, cfg.query, "query")
        self.key_dim = query_dims[self.query]
        self.g_sites = select_sites(sites, cfg.g_layers, "g_layers") if cfg.g_length else []
        self.e_sites = select_sites(sites, cfg.e_layers, "e_layers")
        g_rows = self._rows(cfg.g_length)
        self.g = nn.ParameterDict({site_name(e, l): nn.Parameter(uniform_(torch.empty(g_rows, w)))
                                   for e, l, w in self.g_sites})
        self.e_prompts = nn.ModuleList()            # per session: ParameterDict by site
        self.e_keys = nn.ParameterList()            # per session: (d_q,)
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def _rows(self, length: int) -> int:
        return 2 * length if self.cfg.position == "prefix" else length

    @property
    def sessions(self) -> int:
        return len(self.e_keys)

    def start_session(self, k: int) -> None:
        """Create session k's E-prompt and key (in order); one that exists is left as it is:
        nothing of it was trained before its session."""
        if k < self.sessions:
            return
        if k != self.sessions:
            raise RuntimeError(f"start_session({k}) after {self.sessions} sessions: call them in order")
        dev = self.anchor.device
        self.e_prompts.append(nn.ParameterDict({
            site_name(e, l): nn.Parameter(uniform_(torch.empty(self._rows(self.cfg.e_length), w, device=dev)))
            for e, l, w in self.e_sites}))
        self.e_keys.append(nn.Parameter(uniform_(torch.empty(self.key_dim, device=dev))))

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return [*self.g.values(), *self.e_prompts[k].values(), self.e_keys[k]]

    def route(self, q: torch.Tensor, seen: Optional[int] = None) -> torch.Tensor:
        """(B,) the session among the first `seen` (None: all) whose E-key is nearest (cosine)
        to each query."""
        return cosine_matrix(q, torch.stack(list(self.e_keys)[:seen])).argmax(1)

    def forward(self, query, missing_text, missing_image, session=None, task_ids=None,
                seen=None) -> PromptOutput:
        """task_ids (B,): at inference, the E-prompt of each sample is given (the identifier's
        choice under `routing: task_id`, or the true session for the oracle); else keys choose."""
        q = query[self.query].detach().float()
        b = q.shape[0]
        losses, routed = {}, None
        if session is not None:                     # training: the known session's E-prompt
            key_loss = (1.0 - cosine_matrix(q, self.e_keys[session].unsqueeze(0))[:, 0]).mean()
            losses["dualprompt_key"] = (self.cfg.key_weight, key_loss)
        elif task_ids is not None:
            chosen = routed = task_ids.long().to(q.device)
        elif self.cfg.routing == "task_id":
            raise ValueError("method.dualprompt.routing=task_id: the forward needs task_ids")
        else:
            chosen = routed = self.route(q, seen)
        out = PromptSet()
        for e, l, _ in self.g_sites:
            out.add((e, l), self.g[site_name(e, l)].unsqueeze(0).expand(b, -1, -1), self.cfg.position)
        for e, l, _ in self.e_sites:
            name = site_name(e, l)
            if session is not None:
                rows = self.e_prompts[session][name].unsqueeze(0).expand(b, -1, -1)
            else:   # per sample: a batch may mix sessions
                n = self.sessions if seen is None else seen
                rows = torch.stack([self.e_prompts[j][name] for j in range(n)])[chosen]
            out.add((e, l), rows, self.cfg.position)   # prefix: L key rows, then L value rows
        return PromptOutput(out.build(), losses, routed=routed)


class DualPromptMethod(PromptMethod):
    """DualPrompt as a plug-in: a shared G-prompt, an E-prompt and key per session. At test
    the E-prompt is chosen by key matching (`routing: keys`, the paper's) or by the product's
    task identification (`routing: task_id`: the model then builds `task_id.*`'s identifier and
    the trainer fits it after each session)."""
    name = "dualprompt"
    # the bench's 4 layers: G in the first (0-1 of 12), E in the next (2-4 of 12)
    bench = {"method.dualprompt.g_layers": [0], "method.dualprompt.e_layers": [1]}
    Settings = DualPromptSettings
    Module = DualPrompt

    @property
    def uses_identifier(self) -> bool:
        return self.cfg.routing == "task_id"

    def identified(self, model, batch, seen):
        return model.route(batch, seen) if self.uses_identifier else None

    def describe(self) -> str:
        c = self.cfg
        g = f"G {c.g_length} at {layer_list(c.g_layers)}, " if c.g_length else ""
        return (f"{c.position}: {g}E {c.e_length} a session at {layer_list(c.e_layers)}, "
                f"E chosen by {'keys' if c.routing == 'keys' else 'task identification'}")
