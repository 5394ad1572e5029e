"""ViLT self-attention on torch's fused `scaled_dot_product_attention`.

transformers' ViLT has no SDPA implementation (attn_implementation="sdpa" raises; open
request transformers#28005): its ViltSelfAttention multiplies, masks and soft-maxes by hand,
the slowest attention torch has, and the frozen backbone is most of every step. `install_attention`
switches the attention modules of a built model (pretrained or tiny alike) to a subclass
whose forward calls SDPA.
It still calls `self.query`, `self.key` and `self.value`, so adapters that wrap those linears
(DeLo, LoRA, peft) keep acting. A call that asks for attention probabilities (or a head
mask, in transformers versions that pass one) takes the original eager forward.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers.models.vilt.modeling_vilt import ViltSelfAttention


class ViltSdpaSelfAttention(ViltSelfAttention):
    """Same parameters and outputs as ViltSelfAttention; the attention itself fused."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, *args, **kwargs):
        head_mask = kwargs.get("head_mask", args[0] if args else None)
        if output_attentions or head_mask is not None:  # SDPA returns no probabilities
            return super().forward(hidden_states, attention_mask, output_attentions, *args, **kwargs)
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.attention_head_size)                    # (B, N, heads, hd)
        q = self.query(hidden_states).view(shape).transpose(1, 2)       # (B, heads, N, hd)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        if attention_mask is not None:  # ViLT's extended additive mask, (B, 1, 1, N)
            attention_mask = attention_mask.to(q.dtype)
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=p)
        return (out.transpose(1, 2).reshape(b, n, self.all_head_size),)


def install_attention(model: nn.Module, implementation: str = "sdpa") -> int:
    """Switch every ViLT self-attention of `model` to `implementation` ("sdpa" or "eager",
    transformers' own) by swapping its class: parameters, state dict and deep copies are
    untouched. Returns how many modules it switched."""
    classes = {"sdpa": ViltSdpaSelfAttention, "eager": ViltSelfAttention}
    if implementation not in classes:
        raise ValueError(f"backbone.attention: expected one of {sorted(classes)}, got {implementation!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, ViltSelfAttention):
            module.__class__ = classes[implementation]
            count += 1
    return count
