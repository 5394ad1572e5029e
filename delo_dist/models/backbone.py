"""The backbone protocol: what an adapter method may know about a frozen multimodal model.

DeLo and the baselines never import ViLT. A backbone tells them:
  - `adapted_linears()`: the linears to wrap, by qualified name (recipe `backbone.targets`
    selects them by suffix: query, key, value by default);
  - which tokens belong to which modality at each adapted layer: `forward` fills
    `ctx.text_tokens` / `ctx.image_tokens` (bool, (B, N)) before the first layer runs;
  - how to build inputs, dummies for a missing modality included: `collate(samples)`;
  - the pooled feature the heads eat: `forward(batch) -> (B, hidden_size)`;
  - cheap per-modality queries for the task-key memory that no adapter influences:
    `first_layer_queries(batch) -> (q_v, q_t)`, which also leaves the batch's token masks
    in `ctx.text_tokens` / `ctx.image_tokens`;
  - `identification_features(batch)`, adapter-free features for task identification: the
    default here builds them from the two calls above and `self.ctx` (the RoutingContext
    the builder received), so a new backbone needs nothing more;
  - optionally `first_layer_module()`, the module whose output `first_layer_queries`
    averages: the model then identifies the task inside the main forward pass, no second pass.
CLIP-like models with two encoders implement the same calls (their text layers see only
text tokens: the other modality's query then comes from the cross-modal guide).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Backbone(nn.Module):
    hidden_size: int

    def adapted_linears(self) -> dict[str, nn.Linear]:
        raise NotImplementedError

    def replace_linear(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent_name), child, module)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def first_layer_queries(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def identification_features(self, batch: dict, pooled: bool = False) -> dict[str, torch.Tensor]:
        """q_v, q_t (B, d): first-layer per-modality means; q_all (B, d): their mean over all
        real tokens of the sequence (weighted by token counts); pooled (B, hidden_size), if
        asked: `forward` with every adapter off (one extra frozen forward)."""
        q_v, q_t = self.first_layer_queries(batch)
        n_v = self.ctx.image_tokens.sum(1, keepdim=True).to(q_v.dtype)
        n_t = self.ctx.text_tokens.sum(1, keepdim=True).to(q_v.dtype)
        feats = {"q_v": q_v, "q_t": q_t, "q_all": (n_v * q_v + n_t * q_t) / (n_v + n_t).clamp(min=1)}
        if pooled:
            enabled, self.ctx.enabled = self.ctx.enabled, False
            try:
                feats["pooled"] = self.forward(batch)
            finally:
                self.ctx.enabled = enabled
        return feats
    def first_layer_module(self) -> nn.Module | None:
        """The module whose output (B, N, d) `first_layer_queries` averages per modality, or
        None. The model hooks it to identify the task inside the main forward pass."""
        return None


_REGISTRY: dict[str, Callable] = {}


def register_backbone(name: str):
    def wrap(builder):
        _REGISTRY[name] = builder
        return builder
    return wrap


def build_backbone(cfg, ctx) -> Backbone:
    from delo_dist.models import vilt  # noqa: F401  (registers itself)
    if cfg.name not in _REGISTRY:
        raise ValueError(f"backbone.name: unknown backbone {cfg.name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.name](cfg, ctx)


def select_targets(linears: dict[str, nn.Linear], targets: list[str]) -> dict[str, nn.Linear]:
    """Keep linears whose name ends with one of the targets (peft's suffix rule)."""
    chosen = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
    if not chosen:
        raise ValueError(f"backbone.targets {targets} match no linear; some names: "
                         f"{sorted(linears)[:6]}")
    return chosen
