"""Methods as small plug-ins chosen by `method.name` in the recipe.

A method module exposes a function `cfg -> MethodSpec` and gets one line in `METHODS`. The
spec says how to build one session's adapter for one linear (None: no adapters), whether
all sessions share one adapter (sequential fine-tuning), and whether it routes by modality
queries (then the alignment and consistency losses apply). The trainer and the model do
not change when a method is added.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from delo_dist.models.registry import resolve


@dataclass(frozen=True)
class MethodSpec:
    make_session: Optional[Callable[..., nn.Module]]  # (d_in, d_out) -> session module
    shared_across_sessions: bool = False
    modality_routed: bool = False   # queries per modality feed routers: L_align / L_con apply
    targets: Optional[tuple] = None  # linears to adapt when the recipe names none
    keep: Optional[Callable] = None  # LinearSite -> bool: which of those (e.g. upper layers)
    site_aware: bool = False         # make_session(d_in, d_out, site=, base=, session=)
    mergeable: bool = False          # sessions have merged_forward: inference runs merged
    # Optional: the method picks its linears itself instead of recipe `backbone.targets`:
    # backbone -> {qualified linear name: session maker for that linear} (MAIL's variants).
    select_linears: Optional[Callable[[nn.Module], dict[str, Callable[[int, int], nn.Module]]]] = None


# name -> "module:function"; the function maps the recipe's method config to a MethodSpec.
METHODS: dict[str, str] = {
    "delo": "delo_dist.models.delo:method",
    "lora": "delo_dist.models.lora:method",                # DeLo-LoRA: a static LoRA per session
    "seq_lora": "delo_dist.models.lora:sequential_method",  # one LoRA fine-tuned across sessions
    "head_only": "delo_dist.models.methods:head_only",     # frozen backbone, a head per session
    "mora": "delo_dist.models.mora:method",                # MoRA set per session (two encoders)
    "seq_mora": "delo_dist.models.mora:sequential_method",  # one MoRA set across sessions
    "mail": "delo_dist.models.mail:mail_spec",              # MAIL mixture per session
    "seq_mail": "delo_dist.models.mail:seq_mail_spec",      # one MAIL mixture across sessions
}


def method_spec(cfg) -> MethodSpec:
    return resolve(METHODS, cfg.name, "method.name")(cfg)


def head_only(cfg) -> MethodSpec:
    """Lower bound: frozen backbone, a new head per session."""
    return MethodSpec(None)
