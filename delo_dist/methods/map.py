"""MAP: missing-aware prompts ("Multimodal Prompting with Missing Modalities for Visual
Recognition", Lee et al., CVPR 2023, arXiv 2303.03369; public code YiLunLee/missing_aware_prompts).

One prompt per missing case - complete, text missing, image missing - at each prompted layer;
each sample gets the prompt of its own case (its availability flags, no routing, no query).
Forward: prompts by case -> one prompted pass -> the shared head. No frozen query pass: MAP
costs one forward with L more tokens per prompted layer (input position) or L/2 more key and
value rows (prefix position).

Positions (`position`):
  input      the L rows are tokens inserted at each prompted layer; they accumulate (6 layers
             of 16 rows: 96 tokens more by the end), as the code's input-level prompting does;
  prefix     the paper's attention-level prompts: the L rows split in half, the first L/2
             prefix keys, the last L/2 prefix values (the code's `learnt_p` attention prompts).
Defaults are the code's (`vilt/config.py`): length 16, layers 0-5, input position.
Init (`init`): "onehot", the code's - zeros with one row of ones per case (complete row 0,
image missing row 1, text missing row 2; in prefix position also row L/2 + that), so the
three cases start apart; or "normal" (std 0.02), our alternative.
Two encoders (CLIP): each encoder's prompted layers get their own three case prompts in its width.

Not continual: one prompt set, shared by every session and fine-tuned session after session
with the shared head (as the CMML papers run it; expect forgetting). session_parameters(k) is
every prompt for every k. A sample missing both modalities has no MAP prompt: an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from delo_dist.methods.prompt_pools import (PromptOutput, PromptSet, check_choice, check_layers,
                                            check_prefix_length, select_sites, site_name)
from delo_dist.methods.prompting import PromptMethod, layer_list

COMPLETE, MISSING_TEXT, MISSING_IMAGE = 0, 1, 2
ONEHOT_ROW = {COMPLETE: 0, MISSING_IMAGE: 1, MISSING_TEXT: 2}   # the code's init rows


@dataclass
class MapSettings:
    length: int = 16
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    position: str = "input"          # input | prefix
    init: str = "onehot"             # onehot (the code's) | normal

    def validate(self, check) -> None:
        check(self.length >= 1, "length", "an int >= 1", self.length)
        check_layers(check, "layers", self.layers)
        check_choice(check, "position", self.position, ("input", "prefix"))
        check_choice(check, "init", self.init, ("onehot", "normal"))
        check_prefix_length(check, "length", self.length, self.position)
        rows = self.length if self.position == "input" else self.length // 2
        check(self.init != "onehot" or rows >= 3, "length",
              "at least 3 rows per half for the onehot init (one per missing case)", self.length)


def missing_case(missing_text: torch.Tensor, missing_image: torch.Tensor) -> torch.Tensor:
    """(B,) case per sample: 0 complete, 1 text missing, 2 image missing."""
    if bool((missing_text & missing_image).any()):
        raise ValueError("a sample misses both modalities: MAP has prompts for the complete, "
                         "text-missing and image-missing cases only")
    return missing_text.long() * MISSING_TEXT + missing_image.long() * MISSING_IMAGE


class Map(nn.Module):
    def __init__(self, cfg: MapSettings, sites, query_dims=None, sessions: int = 1):
        super().__init__()
        self.cfg = cfg
        self.sites = select_sites(sites, cfg.layers, "layers")
        self.prompts = nn.ParameterDict({site_name(e, l): nn.Parameter(self._init(w))
                                         for e, l, w in self.sites})   # (3 cases, L, d) each

    def _init(self, width: int) -> torch.Tensor:
        p = torch.zeros(3, self.cfg.length, width)
        if self.cfg.init == "normal":
            return nn.init.normal_(p, std=0.02)
        half = self.cfg.length // 2
        for case, row in ONEHOT_ROW.items():
            p[case, row] = 1.0
            if self.cfg.position == "prefix":
                p[case, half + row] = 1.0
        return p

    def start_session(self, k: int) -> None:
        pass   # nothing per session

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return list(self.prompts.values())

    def forward(self, query, missing_text, missing_image, session=None, task_ids=None,
                seen=None) -> PromptOutput:
        case = missing_case(missing_text, missing_image)               # (B,)
        out = PromptSet()
        for e, l, _ in self.sites:
            out.add((e, l), self.prompts[site_name(e, l)][case], self.cfg.position)  # (B, L, d)
        return PromptOutput(out.build())


class MapMethod(PromptMethod):
    """MAP as a plug-in: each sample's missing-case prompts, no frozen query pass; one prompt
    set and the shared head fine-tuned session after session (not continual)."""
    name = "map"
    # the bench's 4 layers: the paper's first half of the encoder (0-5 of 12) is 0-1
    bench = {"method.map.layers": [0, 1]}
    Settings = MapSettings
    Module = Map
    reads_query = False

    def describe(self) -> str:
        c = self.cfg
        return (f"{c.position} prompts, 3 cases x length {c.length} at layers {layer_list(c.layers)}, "
                "shared by all sessions")
