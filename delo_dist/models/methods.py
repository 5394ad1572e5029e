"""Methods as small plug-ins chosen by `method.name` in the recipe.

A method says how to build one session's adapter for one linear (None: no adapters),
whether all sessions share one adapter (sequential fine-tuning), and whether it routes by
modality queries (then the alignment and consistency losses apply). New methods (MAIL,
MoRA) register a builder here; the trainer and the model do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from delo_dist.models.delo import DeloSession
from delo_dist.models.lora import LoraSession


@dataclass(frozen=True)
class MethodSpec:
    make_session: Optional[Callable[[int, int], nn.Module]]  # (d_in, d_out) -> session module
    shared_across_sessions: bool = False
    modality_routed: bool = False   # queries per modality feed routers: L_align / L_con apply
    # Optional: the method picks its linears itself instead of recipe `backbone.targets`:
    # backbone -> {qualified linear name: session maker for that linear} (MAIL's variants).
    targets: Optional[Callable[[nn.Module], dict[str, Callable[[int, int], nn.Module]]]] = None


_METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def wrap(builder):
        _METHODS[name] = builder
        return builder
    return wrap


def method_spec(cfg) -> MethodSpec:
    if cfg.name not in _METHODS:
        raise ValueError(f"method.name: unknown method {cfg.name!r}; known: {sorted(_METHODS)}")
    return _METHODS[cfg.name](cfg)


@register_method("delo")
def _delo(cfg):
    return MethodSpec(lambda i, o: DeloSession(i, o, cfg), modality_routed=cfg.modality_pools)


@register_method("lora")  # DeLo-LoRA: a static rank-r LoRA per session, still task-partitioned
def _lora(cfg):
    return MethodSpec(lambda i, o: LoraSession(i, o, cfg))


@register_method("seq_lora")  # lower bound: one LoRA fine-tuned session after session
def _seq_lora(cfg):
    return MethodSpec(lambda i, o: LoraSession(i, o, cfg), shared_across_sessions=True)


@register_method("mail")  # MAIL: a mixture of LoRA experts per session, chosen by the task keys
def _mail(cfg):
    from delo_dist.models.mail import mail_spec
    return mail_spec(cfg)


@register_method("seq_mail")  # MAIL fine-tuned session after session (one mixture)
def _seq_mail(cfg):
    from delo_dist.models.mail import seq_mail_spec
    return seq_mail_spec(cfg)


@register_method("head_only")  # lower bound: frozen backbone, a new head per session
def _head_only(cfg):
    return MethodSpec(None)
