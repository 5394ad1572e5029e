"""Prompts in the backbone protocol: input-level prompt tokens and attention-level prefixes.

A prompt method (MAP, MSP, L2P, DualPrompt, CODA-Prompt, RebQ) never edits a transformer. It
puts a `Prompts` on the routing context for one forward pass,

    with use_prompts(model.ctx, Prompts(input={("joint", 0): p})):   # p: (B, P, d)
        pooled = model.backbone(batch)

and hooks the backbone installed at build time (`PromptHooks`, one per encoder) do the rest.
Sites are (encoder, layer): encoder "joint" for ViLT, "text" / "image" for CLIP's two
encoders; layer is 0-based; `Backbone.prompt_sites()` lists them with their widths.

  input   {(encoder, layer): (B, P, d)}: learned tokens inserted into the sequence at that
          layer's input, after the first token ([CLS] / [BOS]) and after the prompts that
          earlier layers inserted. They stay in the sequence for the following layers (MAP:
          a prompt in each of the first layers, accumulating; L2P: layer 0 only), unless
          `replace_input` (VPT-deep, RebQ's memory prompts: a layer's prompts replace the
          ones before them). At the end of the encoder, before its final norm and pooling,
          they are removed: pooled features, last_hidden_state's length, CLIP's EOS pooling
          index and ViLT's text position table are untouched (prompts are added after the
          embeddings, so they consume no position). Their final hidden states (before the
          final norm) are left in `prompts.outputs[encoder]`, (B, n, d). Intermediate hidden
          states that transformers returns on request (output_hidden_states) keep them.
  prefix  {(encoder, layer): (keys (B, P, d), values (B, P, d))}: rows prepended to that
          layer's self-attention keys and values (prefix tuning, MAP's "attention" prompts,
          DualPrompt, CODA-Prompt). d is the model's hidden width: the rows are already in key
          and value space (the layer's key / value projections, and adapters wrapping them,
          do not act on them) and are split into heads like the projected keys. Every query
          attends to them (unless a row mask leaves a row out, below).
A tensor may also be (1, P, d) or (P, d): one prompt shared by every sample.
  input_mask, prefix_mask  {(encoder, layer): (B, P) bool}, optional: False marks a row that
          is absent for that sample (MSP drops the prompt of a missing modality; batches keep
          fixed shapes, so the row is there but must not count). An absent row's key is masked
          out of every query's attention (an absent input token still computes, nobody reads
          it, and it is removed at the end like the others). Without masks every row counts.

Masks. The hooks rebuild the attention mask of a prompted layer from transformers' own, in
its own form (ViLT's additive padding mask; CLIP text's causal + padding mask, boolean under
SDPA, additive under eager): padded keys stay masked; every token attends to the prompts,
except that in a causal encoder (CLIP text) [BOS] precedes them; a prompt attends to what the
first token attends to (causal: [BOS] only, never later text) and to the prompts before it and
itself (bidirectional: all prompts); prefix keys are visible to all. Causality among text
tokens is kept: a text token's output depends on the text before it, the prompts and the prefix.
While input prompts are in the sequence, the context's token masks (`ctx.text_tokens`,
`ctx.image_tokens`) carry False at their positions, so modality queries (DeLo's routers,
MAIL's) still average the real tokens: adapters and prompts coexist.

Off costs nothing: with `ctx.prompts` None, `ctx.enabled` False (an adapter-free pass is also
prompt-free) or only zero-length prompts, every hook returns at once and the forward runs
transformers' own code: outputs are bit-identical to the frozen backbone.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import nn


class PromptSite(NamedTuple):
    encoder: str   # "joint" (ViLT), "text" or "image" (CLIP)
    layer: int     # 0-based layer of that encoder
    width: int     # d: hidden width of that encoder (input tokens and prefix rows)


@dataclass
class Prompts:
    input: dict = field(default_factory=dict)    # {(encoder, layer): (B, P, d)}
    prefix: dict = field(default_factory=dict)   # {(encoder, layer): ((B, P, d), (B, P, d))}
    replace_input: bool = False                  # a layer's input prompts replace earlier ones
    outputs: dict = field(default_factory=dict)  # filled: {encoder: (B, n, d)} final prompt states
    input_mask: dict = field(default_factory=dict)    # {(encoder, layer): (B, P) bool}, True = there
    prefix_mask: dict = field(default_factory=dict)   # {(encoder, layer): (B, P) bool}


@contextmanager
def use_prompts(ctx, prompts: Prompts | None):
    """Set `ctx.prompts` for the calls inside the block, and restore what was there after."""
    before, ctx.prompts = ctx.prompts, prompts
    try:
        yield prompts
    finally:
        ctx.prompts = before


def batched(t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, P, d), (1, P, d) or (P, d) -> (B, P, d) in dtype (a view when shared)."""
    return (t if t.dim() == 3 else t.unsqueeze(0)).to(dtype).expand(batch, -1, -1)


def with_prefix(prefix, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected keys and values (B, N, d) with a site's prefix rows (keys, values), each
    (B, P, d), (1, P, d) or (P, d), in key / value space, before them: (B, P + N, d) each."""
    b = k.shape[0]
    return (torch.cat([batched(prefix[0], b, k.dtype), k], 1),
            torch.cat([batched(prefix[1], b, v.dtype), v], 1))


def _check(what: str, site, t: torch.Tensor, batch: int, width: int) -> int:
    if t.dim() not in (2, 3) or t.shape[-1] != width or (t.dim() == 3 and t.shape[0] not in (1, batch)):
        raise ValueError(f"prompts.{what}[{site}]: expected (B={batch} or 1, P, {width}) or "
                         f"(P, {width}), got {tuple(t.shape)}")
    return t.shape[-2]


def _insert_false(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(B, N) token mask -> (B, N + n): n False columns after the first token."""
    if mask is None or n == 0:
        return mask
    return torch.cat([mask[:, :1], mask.new_zeros(mask.shape[0], n), mask[:, 1:]], 1)


def _row_mask(masks: dict, site, batch: int, rows: int, device) -> torch.Tensor | None:
    """The (B, rows) presence mask given for a site, checked, or None (every row there)."""
    m = masks.get(site) if masks else None
    if m is None:
        return None
    if m.shape != (batch, rows):
        raise ValueError(f"prompts mask [{site}]: expected (B={batch}, P={rows}), got {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.bool)


def mask_keys(mask: torch.Tensor | None, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask (None, bool or additive; (B or 1, 1, Q, K)) with the keys where keep
    (B, K) is False masked for every query. Without a mask, an additive one in `dtype`."""
    drop = ~keep[:, None, None, :]
    if mask is None:
        return torch.zeros(drop.shape, dtype=dtype, device=keep.device).masked_fill(
            drop, torch.finfo(dtype).min)
    if mask.dtype == torch.bool:
        return mask & ~drop
    return torch.where(drop, torch.finfo(mask.dtype).min, mask)   # broadcasts (1, 1, Q, K) up


def extend_mask(mask: torch.Tensor | None, n: int, n_pre: int, causal: bool,
                length: int, device) -> torch.Tensor | None:
    """transformers' self-attention mask for a sequence of `length` tokens (None; bool, True =
    attend; or additive float; shape (B or 1, 1, N or 1, N)) -> the mask for that sequence with
    n prompt tokens after its first token, and n_pre prefix keys in front of all keys."""
    if mask is None:
        if not causal:
            return None  # nothing to mask: prompts and prefixes are seen by all
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    yes, no = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    b, _, q, k = mask.shape
    if n:
        cols = mask.new_full((b, 1, q, n), yes)           # every token sees the prompts ...
        if causal:
            cols[:, :, 0] = no                            # ... but [BOS], which precedes them
        mask = torch.cat([mask[..., :1], cols, mask[..., 1:]], -1)
        if q > 1:  # a prompt sees what the first token sees, and the prompts (causal: up to itself)
            rows = mask[..., :1, :].expand(b, 1, n, k + n).clone()
            block = mask.new_full((n, n), yes)
            if causal:
                block.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1), no)
            rows[..., 1:1 + n] = block
            mask = torch.cat([mask[..., :1, :], rows, mask[..., 1:, :]], -2)
    if n_pre:
        mask = torch.cat([mask.new_full((b, 1, mask.shape[2], n_pre), yes), mask], -1)
    return mask


def _attention_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention scores are computed in: autocast's when it is on (a float mask
    must match the query's dtype under SDPA), else the hidden states'."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


class PromptHooks:
    """The prompt hooks of one encoder: a forward pre-hook on each layer inserts that layer's
    input prompts and gives it the mask for prompts and prefix; a forward hook on the encoder
    removes the prompts from its output; the encoder's attention modules ask `prefix(layer)`
    for their prefix rows (they hold `prompt_hooks` and `prompt_layer` for that)."""

    def __init__(self, ctx, encoder: str, encoder_module: nn.Module, layers, attentions,
                 width: int, causal: bool = False, encoders: tuple = ()):
        self.ctx, self.encoder, self.width, self.causal = ctx, encoder, width, causal
        self.encoders = tuple(encoders) or (encoder,)   # every encoder of the backbone
        self.n = 0                     # prompt tokens now in the sequence (after the first token)
        self._keep = None              # (B, n) bool presence of those tokens (None: all there)
        self._keep_version = 0         # changes with _keep: masks are cached per version
        self._saved = None             # the context's token masks at the encoder's input
        self._masks, self._mask_src = {}, None   # prompted masks of this pass, by (n, n_pre)
        self._handles = [encoder_module.register_forward_hook(self._after_encoder)]
        for i, (layer, attention) in enumerate(zip(layers, attentions)):
            self._handles.append(layer.register_forward_pre_hook(
                partial(self._before_layer, i), with_kwargs=True))
            attention.prompt_hooks, attention.prompt_layer = self, i
        self._attentions = list(attentions)

    def sites(self) -> list[PromptSite]:
        return [PromptSite(self.encoder, i, self.width) for i in range(len(self._attentions))]

    def detach(self) -> None:
        """Remove every hook (the encoder runs as if prompts never existed)."""
        for h in self._handles:
            h.remove()
        for a in self._attentions:
            a.prompt_hooks = None

    def active(self) -> Prompts | None:
        p = self.ctx.prompts
        return p if p is not None and self.ctx.enabled else None

    def prefix(self, layer: int):
        """(keys, values) for that layer's attention, or None (no prefix: transformers' path)."""
        p = self.ctx.prompts
        if p is None or not p.prefix or not self.ctx.enabled:
            return None
        kv = p.prefix.get((self.encoder, layer))
        return None if kv is None or kv[0].shape[-2] == 0 else kv

    def _before_layer(self, i: int, module, args, kwargs):
        p = self.active()
        if p is None:
            return None
        if i == 0:  # a new pass through this encoder
            self._check_sites(p)
            self.n, self._keep, self._masks, self._mask_src = 0, None, {}, None
            self._saved = (self.ctx.text_tokens, self.ctx.image_tokens)
            p.outputs.pop(self.encoder, None)
        site = (self.encoder, i)
        hidden = args[0]
        b = hidden.shape[0]
        new = p.input.get(site)
        if new is not None and _check("input", site, new, b, self.width):
            if p.replace_input and self.n:
                hidden = torch.cat([hidden[:, :1], hidden[:, 1 + self.n:]], 1)
                self.n, self._keep = 0, None
                self._keep_version += 1
            at = 1 + self.n
            hidden = torch.cat([hidden[:, :at], batched(new, b, hidden.dtype), hidden[:, at:]], 1)
            keep = _row_mask(p.input_mask, site, b, new.shape[-2], hidden.device)
            if keep is not None or self._keep is not None:   # presence of every prompt token
                ones = lambda k: torch.ones(b, k, dtype=torch.bool, device=hidden.device)  # noqa: E731
                keep = ones(new.shape[-2]) if keep is None else keep
                self._keep = torch.cat([ones(self.n) if self._keep is None else self._keep, keep], 1)
                self._keep_version += 1
            self.n += new.shape[-2]
            text, image = self._saved
            self.ctx.text_tokens = _insert_false(text, self.n)
            self.ctx.image_tokens = _insert_false(image, self.n)
        kv, n_pre, pre_keep = p.prefix.get(site), 0, None
        if kv is not None:
            n_pre = _check("prefix", site, kv[0], b, self.width)
            if _check("prefix", site, kv[1], b, self.width) != n_pre:
                raise ValueError(f"prompts.prefix[{site}]: keys and values differ in length "
                                 f"({n_pre} and {kv[1].shape[-2]})")
            pre_keep = _row_mask(p.prefix_mask, site, b, n_pre, hidden.device)
        if self.n == 0 and n_pre == 0:
            return None
        positional = len(args) > 1
        mask = args[1] if positional else kwargs.get("attention_mask")
        mask = self._mask(mask, n_pre, hidden, pre_keep, i)
        if positional:
            return (hidden, mask, *args[2:]), kwargs
        return (hidden, *args[1:]), {**kwargs, "attention_mask": mask}

    def _check_sites(self, p: Prompts) -> None:
        layers = len(self._attentions)
        for what, sites in (("input", p.input), ("prefix", p.prefix)):
            for site in sites:
                encoder, layer = site
                mine = encoder == self.encoder
                if encoder not in self.encoders or (mine and not 0 <= layer < layers):
                    raise ValueError(f"prompts.{what}[{site}]: no such site; encoders "
                                     f"{list(self.encoders)}, layers 0..{layers - 1} of "
                                     f"{self.encoder!r}")

    def _mask(self, mask, n_pre: int, hidden: torch.Tensor, pre_keep=None, layer: int = -1):
        if mask is not self._mask_src:  # transformers passes one mask object to every layer
            self._masks, self._mask_src = {}, mask
        # row masks: the prompt tokens' by version, the prefix's by the Prompts' own tensor
        # (alive for the whole pass, so its id is not reused)
        src = self.ctx.prompts.prefix_mask.get((self.encoder, layer)) if pre_keep is not None else None
        key = (self.n, n_pre, self._keep_version if self._keep is not None else -1, id(src))
        if key not in self._masks:
            out = extend_mask(mask, self.n, n_pre, self.causal, hidden.shape[1] - self.n,
                              hidden.device)
            if self._keep is not None or pre_keep is not None:
                out = mask_keys(out, self._key_presence(hidden, n_pre, pre_keep), _attention_dtype(hidden))
            self._masks[key] = out
        return self._masks[key]

    def _key_presence(self, hidden: torch.Tensor, n_pre: int, pre_keep) -> torch.Tensor:
        """(B, n_pre + N) presence of every key: [prefix rows][first token][prompt tokens][rest]."""
        b, length = hidden.shape[:2]
        ones = lambda k: torch.ones(b, k, dtype=torch.bool, device=hidden.device)  # noqa: E731
        parts = [pre_keep if pre_keep is not None else ones(n_pre), ones(1),
                 self._keep if self._keep is not None else ones(self.n), ones(length - 1 - self.n)]
        return torch.cat(parts, 1)

    def _after_encoder(self, module, args, output):
        p = self.active()
        if p is None:
            return None
        n, self.n, self._keep, self._masks, self._mask_src = self.n, 0, None, {}, None
        if self._saved is not None:
            self.ctx.text_tokens, self.ctx.image_tokens = self._saved
            self._saved = None
        if n == 0:
            return None
        h = output[0]                                      # (B, 1 + n + N - 1, d)
        p.outputs[self.encoder] = h[:, 1:1 + n]
        h = torch.cat([h[:, :1], h[:, 1 + n:]], 1)         # (B, N, d): the encoder's own tokens
        if isinstance(output, tuple):
            return (h, *output[1:])
        output.last_hidden_state = h
        return output
