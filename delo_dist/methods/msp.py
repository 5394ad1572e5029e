"""MSP: modality-specific prompts ("Towards Robust Multimodal Prompting With Missing
Modalities", Jang, Wang and Kim, ICASSP 2024, arXiv 2312.15890; no public code found).

Instead of MAP's prompt per missing case (2^M - 1 of them), one prompt per modality, P_text
and P_image, at each prompted layer, with an orthogonality loss between them so that each
learns what is particular to its modality. A sample gets [P_text; P_image] rows.
Forward: prompts by availability -> one prompted pass -> the shared head. No frozen query
pass: one forward with 2L more tokens per prompted layer (input) or L more key and value rows.

Where the paper is silent here (the text we could reach gives the design, not these), our
choices, each a key under `method.msp`:
  - `missing`: "drop" (default) - a missing modality's prompt is left out, the sample keeps
    the prompts of the modalities it has (the reading of "modality-specific tokens"); "keep" -
    both prompts for every sample. Batches have fixed shapes, so a dropped prompt's rows are
    zero rows, marked absent in the per-row masks of the hooks' Prompts (`input_mask` /
    `prefix_mask`): their keys are masked out of attention, so the sample attends only to the
    prompts it has.
  - `ortho_weight` 1.0, on the mean squared cosine between every row of P_text and every row
    of P_image at each prompted layer (0 when the two are orthogonal), averaged over layers.
  - `length` 16 rows per modality, `layers` 0-5, `position` input: MAP's settings, on which
    the paper builds.
  - init normal (std 0.02): random prompts, so the loss starts near 0 rather than at MAP's
    one-row init where all rows of ones would start parallel.
Two encoders (CLIP): each encoder's prompted layers get both modality prompts in its width
(the loss then compares prompts of one width).

Not continual: one prompt pair, shared by every session and fine-tuned session after session
with the shared head. session_parameters(k) is every prompt for every k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from delo_dist.methods.prompt_pools import (PromptOutput, PromptSet, check_choice, check_layers,
                                            check_prefix_length, select_sites, site_name)
from delo_dist.methods.prompting import PromptMethod, layer_list


@dataclass
class MspSettings:
    length: int = 16                 # rows per modality prompt
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    position: str = "input"          # input | prefix
    missing: str = "drop"            # drop | keep
    ortho_weight: float = 1.0

    def validate(self, check) -> None:
        check(self.length >= 1, "length", "an int >= 1", self.length)
        check_layers(check, "layers", self.layers)
        check_choice(check, "position", self.position, ("input", "prefix"))
        check_choice(check, "missing", self.missing, ("drop", "keep"))
        check_prefix_length(check, "length", self.length, self.position)
        check(self.ortho_weight >= 0, "ortho_weight", "a non-negative weight", self.ortho_weight)


def cross_orthogonality(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between every row of a (L, d) and every row of b (L, d)."""
    return (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()).pow(2).mean()


class Msp(nn.Module):
    def __init__(self, cfg: MspSettings, sites, query_dims=None, sessions: int = 1):
        super().__init__()
        self.cfg = cfg
        self.sites = select_sites(sites, cfg.layers, "layers")
        def new(w):
            return nn.Parameter(nn.init.normal_(torch.empty(cfg.length, w), std=0.02))
        self.text = nn.ParameterDict({site_name(e, l): new(w) for e, l, w in self.sites})
        self.image = nn.ParameterDict({site_name(e, l): new(w) for e, l, w in self.sites})

    def start_session(self, k: int) -> None:
        pass

    def session_parameters(self, k: int) -> list[nn.Parameter]:
        return [*self.text.values(), *self.image.values()]

    def _rows(self, p: torch.Tensor, present: torch.Tensor):
        """(L, d) prompt -> (B, L, d) for the batch, zero where dropped, and its row mask."""
        b = present.shape[0]
        rows = p.unsqueeze(0).expand(b, -1, -1)
        if self.cfg.missing == "keep":
            return rows, None
        return rows * present[:, None, None].to(p.dtype), present[:, None].expand(b, p.shape[0])

    def forward(self, query, missing_text, missing_image, session=None, task_ids=None,
                seen=None) -> PromptOutput:
        out = PromptSet()
        for e, l, _ in self.sites:
            name = site_name(e, l)
            t, mt = self._rows(self.text[name], ~missing_text)
            v, mv = self._rows(self.image[name], ~missing_image)
            # prefix: each modality's prompt splits in half, its keys and its values
            out.add((e, l), t, self.cfg.position, mt)
            out.add((e, l), v, self.cfg.position, mv)
        losses = {}
        if session is not None and self.cfg.ortho_weight > 0:
            ortho = torch.stack([cross_orthogonality(self.text[n], self.image[n]) for n in self.text]).mean()
            losses["msp_ortho"] = (self.cfg.ortho_weight, ortho)
        return PromptOutput(out.build(), losses)


class MspMethod(PromptMethod):
    """MSP as a plug-in: a text and an image prompt with their orthogonality loss, no frozen
    query pass; one prompt pair and the shared head fine-tuned session after session."""
    name = "msp"
    bench = {"method.msp.layers": [0, 1]}   # 0-5 of 12 layers, at the bench's 4
    Settings = MspSettings
    Module = Msp
    reads_query = False

    def describe(self) -> str:
        c = self.cfg
        return (f"{c.position} prompts, 2 modalities x length {c.length} at layers "
                f"{layer_list(c.layers)}, missing: {c.missing}, shared by all sessions")
