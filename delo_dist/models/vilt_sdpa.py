"""ViLT self-attention on torch's fused `scaled_dot_product_attention`, and prefix prompts.

transformers' ViLT has no SDPA implementation (attn_implementation="sdpa" raises; open
request transformers#28005): its ViltSelfAttention multiplies, masks and soft-maxes by hand,
the slowest attention torch has, and the frozen backbone is most of every step. `install_attention`
switches the attention modules of a built model (pretrained or tiny alike) to a subclass
whose forward calls SDPA (`sdpa`), or to transformers' own computation (`eager`).
Both subclasses still call `self.query`, `self.key` and `self.value`, so adapters that wrap
those linears (DeLo, LoRA, peft) keep acting, and both take prefix prompts (prompts.py): when
the layer's `prompt_hooks` give (keys, values) rows, (B, P, d) each, they are prepended to the
projected keys and values before the head split; without them `eager` runs transformers'
forward itself and `sdpa` the same fused call as before. A call that asks for attention
probabilities (or a head mask, in transformers versions that pass one) takes the eager path.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn
from transformers.models.vilt.modeling_vilt import ViltSelfAttention

from delo_dist.models.prompts import with_prefix


class ViltEagerSelfAttention(ViltSelfAttention):
    """transformers' ViltSelfAttention, plus prefix keys and values when prompts give them."""
    prompt_hooks = None   # PromptHooks of the encoder (set by the backbone), and this layer
    prompt_layer = -1

    def prefix(self):
        hooks = self.prompt_hooks
        return None if hooks is None else hooks.prefix(self.prompt_layer)

    def heads(self, hidden_states, prefix=None):
        """q (B, heads, N, hd); k, v (B, heads, P + N, hd): the prefix rows before the tokens'."""
        b, n, _ = hidden_states.shape
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        if prefix is not None:  # rows already in key / value space, (B, P, d)
            k, v = with_prefix(prefix, k, v)
        hd = self.attention_head_size
        split = lambda t: t.view(b, t.shape[1], -1, hd).transpose(1, 2)  # noqa: E731
        return split(q), split(k), split(v)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, *args, **kwargs):
        prefix = self.prefix()
        if prefix is None:
            return super().forward(hidden_states, attention_mask, output_attentions, *args, **kwargs)
        q, k, v = self.heads(hidden_states, prefix)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:  # (B, 1, N, P + N), additive, from the prompt hooks
            scores = scores + attention_mask
        probs = self.dropout(scores.softmax(-1))
        out = (probs @ v).transpose(1, 2).reshape(*hidden_states.shape[:2], self.all_head_size)
        return (out, probs) if output_attentions else (out,)


class ViltSdpaSelfAttention(ViltEagerSelfAttention):
    """Same parameters and outputs as ViltSelfAttention; the attention itself fused."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, *args, **kwargs):
        head_mask = kwargs.get("head_mask", args[0] if args else None)
        if output_attentions or head_mask is not None:  # SDPA returns no probabilities
            return super().forward(hidden_states, attention_mask, output_attentions, *args, **kwargs)
        b, n, _ = hidden_states.shape
        q, k, v = self.heads(hidden_states, self.prefix())  # (B, heads, N or P + N, hd)
        if attention_mask is not None:  # ViLT's additive mask (B, 1, N, N); prefix: (B, 1, N, P + N)
            attention_mask = attention_mask.to(q.dtype)
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=p)
        return (out.transpose(1, 2).reshape(b, n, self.all_head_size),)


def install_attention(model: nn.Module, implementation: str = "sdpa") -> int:
    """Switch every ViLT self-attention of `model` to `implementation` ("sdpa" or "eager",
    transformers' own computation) by swapping its class: parameters, state dict and deep
    copies are untouched. Returns how many modules it switched."""
    classes = {"sdpa": ViltSdpaSelfAttention, "eager": ViltEagerSelfAttention}
    if implementation not in classes:
        raise ValueError(f"backbone.attention: expected one of {sorted(classes)}, "
                         f"got {implementation!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, ViltSelfAttention):
            module.__class__ = classes[implementation]
            count += 1
    return count
