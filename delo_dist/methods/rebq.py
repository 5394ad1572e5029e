"""RebQ: Reconstruct before Query ("Reconstruct before Query: Continual Missing Modality Learning
with Decomposed Prompt Collaboration", Zhao et al., arXiv 2403.11373; read: public code
Tree-Shu-Zhao/RebQ.pytorch, src/model/rebq.py and rebq_vilt.py).

Three CODA-Prompt pools (see coda_prompt.py), each with per-session slices:
  - a text pool queried by the text query and an image pool queried by the image query (the
    frozen backbone's text [CLS] and first image token on ViLT; CLIP's two encoders' outputs),
    prefix prompts in `layers`;
  - a memory pool whose prompts let the backbone reconstruct a missing modality's query: the
    memory pass is a prompted pass whose output at the missing modality's query position is
    the reconstructed query.
One training step (rows = the batch, then `augmented` copies of its complete samples with
one modality replaced by its dummy: `augmentation()` lists them, text then image dropped for
each complete sample, as the code's collate does):
  1. frozen query pass over all rows (no prompts, no gradient) -> `query`;
  2. memory_prompts(query, ...): per row, memory(text query) if the row has its text plus
     memory(image query) if it has its image (ViLT: one pool, both summed; CLIP: the text
     encoder's memory is queried by the image query and the image encoder's by the text query);
  3. memory pass over all rows with those prompts (with gradient) -> `memory`, the same
     entries as the frozen query (the backbone's query pass honouring the prompts);
  4. forward(query, ..., memory=memory, augmented=...): for the batch's rows, the text query
     is the frozen one if the text is there, else the memory pass's reconstruction (likewise
     the image); the text and image pools give the prompts of the main pass; the
     reconstruction loss is the mean over augmented rows of mean((memory[dropped](copy) -
     target[dropped](original))^2), target detached;
  5. main prompted pass over the batch's rows -> the shared head.
Cost: a frozen query pass and a memory pass (with its backward) on top of the main pass, on
the batch plus two copies of each complete sample at training; at inference the memory pass
runs only when some sample misses a modality (`needs_memory`), on the batch alone.

Defaults are the code's (configs/model/rebq.yaml): pool 128 components over all sessions per
pool, length 8, 8 layers (0-7) for the text and image pools in prefix position, the memory
pool 8 layers (0-7), length 8, input position, reconstruction weight 0.01 (ALPHA), no
orthogonality loss (`ortho_weight` 0, as the code; the key is there).
Our choices and where we differ from the code:
  - every session's slice is initialised by Gram-Schmidt against the earlier slices, as
    CODA-Prompt re-initialises each new task's components; the code's default REINIT: False
    keeps the init of the construction, which orthonormalises only the first task's slice
    and leaves the later slices at zero (where, with K = A = P = 0, they get no gradient);
  - `memory_input`: memory prompts in input position replace the previous layer's memory
    tokens at each of `memory_layers` ("replace", the code's; the hooks' `replace_input`), or
    accumulate through them ("accumulate": MAP's way);
  - `reconstruction_target` "frozen" (default): the complete original's frozen query - what
    the pools are queried with when the modality is there, so what a reconstruction stands in
    for; "memory": the code's, the original's memory-pass output. That target moves with the
    memory prompts it trains: where the memory prompts act additively it holds the same
    memory(other modality) term as the prediction, which cancels, and the loss cannot fall
    (the unit tests' additive stand-in for the memory pass: 20 Adam steps take the frozen
    target's loss to under 0.3x its start, the memory target's up);
  - on two encoders (CLIP) the reconstruction crosses encoders as described in step 2.

Per session: slice k of each layer's text, image and memory pools (K, A, P), separate tensors,
earlier slices detached in session k's training forward. Shared: nothing (the head is the
integrator's). session_parameters(k): slice k of every pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from delo_dist.methods.prompt_pools import (ComponentPool, PromptOutput, PromptSet, check_choice,
                                            check_layers, check_prefix_length, modality_queries,
                                            per_session, select_sites, site_name, start_pools)
from delo_dist.methods.prompting import PromptMethod, layer_list
from delo_dist.models.adapters import PROXY_IMAGE as DROP_IMAGE
from delo_dist.models.adapters import PROXY_TEXT as DROP_TEXT
from delo_dist.models.inputs import concat_batches


@dataclass
class RebQSettings:
    pool_size: int = 128             # components per pool over all sessions
    length: int = 8
    layers: list[int] = field(default_factory=lambda: list(range(8)))
    position: str = "prefix"         # prefix | input (text and image pools)
    memory_length: int = 8
    memory_layers: list[int] = field(default_factory=lambda: list(range(8)))
    memory_position: str = "input"   # input | prefix
    memory_input: str = "replace"    # replace (the code's) | accumulate: input memory prompts
    reconstruction_weight: float = 0.01
    reconstruction_target: str = "frozen"   # frozen | memory (the code's)
    ortho_weight: float = 0.0

    def validate(self, check) -> None:
        check(self.pool_size >= 1, "pool_size", "an int >= 1", self.pool_size)
        for key in ("length", "memory_length"):
            check(getattr(self, key) >= 1, key, "an int >= 1", getattr(self, key))
        check_layers(check, "layers", self.layers)
        check_layers(check, "memory_layers", self.memory_layers)
        for key, length in (("position", self.length), ("memory_position", self.memory_length)):
            check_choice(check, key, getattr(self, key), ("prefix", "input"))
            check_prefix_length(check, key.replace("position", "length"), length, getattr(self, key))
        check(self.reconstruction_weight >= 0, "reconstruction_weight", "a non-negative weight",
              self.reconstruction_weight)
        check_choice(check, "reconstruction_target", self.reconstruction_target, ("memory", "frozen"))
        check_choice(check, "memory_input", self.memory_input, ("replace", "accumulate"))
        check(self.ortho_weight >= 0, "ortho_weight", "a non-negative weight", self.ortho_weight)


def augmentation(missing_text: torch.Tensor, missing_image: torch.Tensor):
    """The copies of the complete samples that train the reconstruction: (source (A,) row of
    the batch, dropped (A,) DROP_TEXT / DROP_IMAGE), each complete sample twice (text dropped,
    then image dropped). The caller appends these rows with the dropped modality's dummy."""
    complete = torch.nonzero(~missing_text & ~missing_image).flatten()
    source = complete.repeat_interleave(2)
    dropped = torch.tensor([DROP_TEXT, DROP_IMAGE], device=source.device).repeat(len(complete))
    return source, dropped


def augmented_flags(missing_text, missing_image, source, dropped):
    """(missing_text, missing_image) of the rows [batch; augmented copies]."""
    return (torch.cat([missing_text, dropped == DROP_TEXT]),
            torch.cat([missing_image, dropped == DROP_IMAGE]))


class RebQ(nn.Module):
    def __init__(self, cfg: RebQSettings, sites, query_dims: dict, sessions: int):
        super().__init__()
        self.cfg = cfg
        self.text_q, self.image_q = modality_queries(query_dims)
        dt, dv = query_dims[self.text_q], query_dims[self.image_q]
        n = per_session(cfg.pool_size, sessions)
        self.sites = select_sites(sites, cfg.layers, "layers")
        self.memory_sites = select_sites(sites, cfg.memory_layers, "memory_layers")
        joint = any(e == "joint" for e, _, _ in sites)
        if joint and dt != dv:
            raise ValueError(f"a joint encoder's memory pool takes both queries: widths {dt} != {dv}")
        self.text_pools = nn.ModuleDict({site_name(e, l): ComponentPool(n, dt, cfg.length, w)
                                         for e, l, w in self.sites if e in ("joint", "text")})
        self.image_pools = nn.ModuleDict({site_name(e, l): ComponentPool(n, dv, cfg.length, w)
                                          for e, l, w in self.sites if e in ("joint", "image")})
        # the text encoder's memory reconstructs the text from the image query, and vice versa
        key_dim = {"joint": dt, "text": dv, "image": dt}
        self.memory_pools = nn.ModuleDict({site_name(e, l): ComponentPool(n, key_dim[e], cfg.memory_length, w)
                                           for e, l, w in self.memory_sites})

    def all_pools(self) -> list[ComponentPool]:
        return [*self.text_pools.values(), *self.image_pools.values(), *self.memory_pools.values()]

    @property
    def sessions(self) -> int:
        return self.all_pools()[0].sessions

    def start_session(self, k: int) -> None:
        start_pools(self.all_pools(), k)

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for pool in self.all_pools() for p in pool.session_parameters(k)]

    def _penalties(self, penalties: list) -> dict:
        """The orthogonality loss term of the pools' penalties (each computed: `want`)."""
        return {"rebq_ortho": (self.cfg.ortho_weight, torch.stack(penalties).sum())}

    @staticmethod
    def needs_memory(missing_text: torch.Tensor, missing_image: torch.Tensor) -> bool:
        """Inference: the memory pass is needed only for samples missing a modality."""
        return bool((missing_text | missing_image).any())

    def memory_prompts(self, query: dict, missing_text, missing_image, session=None,
                       seen=None) -> PromptOutput:
        """Prompts of the memory pass over all rows (the batch and its augmented copies)."""
        has_t = (~missing_text)[:, None, None].float()
        has_v = (~missing_image)[:, None, None].float()
        t, v = query[self.text_q].detach(), query[self.image_q].detach()
        want = session is not None and self.cfg.ortho_weight > 0
        out, penalties = PromptSet(), []
        for e, l, _ in self.memory_sites:
            pool = self.memory_pools[site_name(e, l)]
            if e == "joint":                       # both queries, the pool stacked once
                (pt, pv), penalty = pool((t, v), session, want, seen)
                rows = pt * has_t + pv * has_v
            elif e == "text":                      # the text encoder, from the image
                rows, penalty = pool(v, session, want, seen)
                rows = rows * has_v
            else:                                  # the image encoder, from the text
                rows, penalty = pool(t, session, want, seen)
                rows = rows * has_t
            penalties.append(penalty)
            out.add((e, l), rows, self.cfg.memory_position)
        replace = self.cfg.memory_position == "input" and self.cfg.memory_input == "replace"
        return PromptOutput(out.build(replace_input=replace), self._penalties(penalties) if want else {})

    def forward(self, query: dict, missing_text, missing_image, session=None, task_ids=None,
                seen=None, memory: Optional[dict] = None,
                augmented: Optional[tuple] = None) -> PromptOutput:
        """query, missing_*, memory: over all rows, the batch first, then the A augmented copies
        (augmented = (source, dropped) from `augmentation`; None: no copies). Returns the main
        pass's prompts for the batch's rows and, in training, the reconstruction loss."""
        a = 0 if augmented is None else len(augmented[0])
        b = missing_text.shape[0] - a
        mt, mi = missing_text[:b], missing_image[:b]
        t, v = query[self.text_q][:b].detach(), query[self.image_q][:b].detach()
        if memory is None and bool((mt | mi).any()):
            raise ValueError("RebQ: samples miss a modality, so the forward needs the memory pass's output")
        if memory is not None:   # reconstructed queries carry gradient into the memory prompts
            t = torch.where(mt[:, None], memory[self.text_q][:b], t)
            v = torch.where(mi[:, None], memory[self.image_q][:b], v)
        want = session is not None and self.cfg.ortho_weight > 0
        out, penalties = PromptSet(), []
        for e, l, _ in self.sites:
            name = site_name(e, l)
            for pools, q in ((self.text_pools, t), (self.image_pools, v)):
                if name in pools:
                    prompt, penalty = pools[name](q, session, want, seen)
                    out.add((e, l), prompt, self.cfg.position)
                    penalties.append(penalty)
        losses = self._penalties(penalties) if want else {}
        if session is not None and augmented is not None:
            losses["rebq_reconstruction"] = (self.cfg.reconstruction_weight,
                                             self.reconstruction_loss(query, memory, b, augmented))
        return PromptOutput(out.build(), losses)

    def reconstruction_loss(self, query: dict, memory: Optional[dict], b: int, augmented) -> torch.Tensor:
        source, dropped = augmented
        if len(source) == 0:
            return torch.zeros((), device=source.device)   # no complete sample in this batch
        target = memory if self.cfg.reconstruction_target == "memory" else query
        rows = b + torch.arange(len(source), device=source.device)
        terms = []
        for code, name in ((DROP_TEXT, self.text_q), (DROP_IMAGE, self.image_q)):
            pick = dropped == code   # never empty: each complete sample gives both copies
            pred, tgt = memory[name][rows[pick]], target[name][source[pick]].detach()
            terms.append(((pred.float() - tgt.float()) ** 2).mean(-1))   # per row, as the code
        return torch.cat(terms).mean()


class RebQMethod(PromptMethod):
    """RebQ as a plug-in. A training step runs, over [batch; its complete samples twice, text
    then image replaced by the backbone's dummy (`Backbone.with_dummy`)]: the frozen query
    pass, the memory pass (`Backbone.prompted_query` under the memory prompts, with gradient),
    then the main prompted pass over the batch's rows. Inference runs the memory pass only for
    batches with a sample missing a modality."""
    name = "rebq"
    # 0-7 of 12 layers, at the bench's 4
    bench = {"method.rebq.layers": [0, 1, 2], "method.rebq.memory_layers": [0, 1, 2]}
    Settings = RebQSettings
    Module = RebQ
    position_keys = ("position", "memory_position")

    def describe(self) -> str:
        c = self.cfg
        return (f"text and image pools {c.pool_size} (a slice a session) x length {c.length}, "
                f"{c.position} at layers {layer_list(c.layers)}; memory pool x length "
                f"{c.memory_length}, {c.memory_position} at layers {layer_list(c.memory_layers)}")

    def prompts(self, model, batch, session=None, seen=None, task_ids=None, query=None, aux=True):
        module, bb = model.prompter, model.backbone
        mt, mi = batch["missing_text"], batch["missing_image"]
        rows, augmented = batch, None
        if session is not None and aux and module.cfg.reconstruction_weight > 0:
            source, dropped = augmentation(mt, mi)      # every step, maybe empty: ranks agree
            augmented = (source, dropped)
            if len(source):
                rows = concat_batches([batch, bb.with_dummy(batch, source, dropped == DROP_TEXT)])
        query = bb.frozen_query(rows) if rows is not batch or query is None else query
        mt_all, mi_all = rows["missing_text"], rows["missing_image"]
        memory, losses = None, {}
        # training: always (every rank's memory pools then get a gradient, even a zero one);
        # inference: only for a batch with a sample missing a modality
        if session is not None or module.needs_memory(mt_all, mi_all):
            mem = module.memory_prompts(query, mt_all, mi_all, session, seen)
            model.set_batch(rows)
            memory = bb.prompted_query(rows, mem.prompts)
            losses = mem.losses
        out = module(query, mt_all, mi_all, session, seen=seen, memory=memory, augmented=augmented)
        for name, (_, value) in losses.items():   # the memory pools' orthogonality, if on (then
            w, v = out.losses[name]                # the text and image pools' is there too)
            out.losses[name] = (w, v + value)
        return out

    def loss_terms(self, model, batch, out, session):
        """The reconstruction loss is a mean over this rank's augmented rows: weighted by them,
        so that after the ranks' gradients are averaged it is the global batch's mean."""
        from delo_dist.models.method import complete_scale
        terms = dict(out["prompt_losses"])
        if "rebq_reconstruction" in terms:
            weight, value = terms["rebq_reconstruction"]
            complete = ~(batch["missing_text"] | batch["missing_image"])
            terms["rebq_reconstruction"] = (weight, value * complete.sum() * complete_scale(batch, complete))
        return terms
