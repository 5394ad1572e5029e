"""The method protocol: what one plug-in module declares, and what the trainer asks of it.

A method is one module holding a `Method` subclass, registered by name (delo_dist/plugins.py).
The class says, in one place:
  name, section, Settings  its recipe section `method.<section>.*` (Settings: a dataclass with
                           defaults and an optional `validate(check)`; seq_* variants share
                           their base method's section)
  needs                    backbone capabilities it requires, each with the reason; checked
                           once when the recipe loads, with one line naming both plug-ins
  head                     "session": a head per session, chosen at inference by the task
                           identifier (`task_id.source`); "shared": one head over every class
                           seen so far (the prompt methods' protocol), no identifier
  shared_across_sessions   adapter methods: one adapter fine-tuned across sessions (seq_*)
  mergeable                sessions have `merged_forward`: inference runs merged (MoRA)
  guide_queries            it routes by the other modality's per-layer query: two-encoder
                           backbones compute that query (a frozen pass) only then
  dummy_image              a missing image: "ones" / "zeros" after normalisation, "white"
                           through it, or "backbone" (the backbone's convention); a Settings
                           field of that name overrides it
and implements what differs from the defaults below (adapters around frozen linears):
  make_session(...)        one session's adapter for one linear (None: no adapters)
  attach(model)            wrap linears / add the method's own modules
  session_parameters(model, k)  what trains in session k (earlier sessions' parts never)
  own_parameters(model, k) its own part of that (session_parameters adds heads[k]):
                           session k's adapters by default, a prompt module's own
  start_session(model, k)  before session k trains (initialise its parts from the trained past)
  forward(model, batch, session, epoch, aux) -> {"logits": (B, classes of `session`), ...}
  loss_terms(model, batch, out, session) -> {name: (weight, scalar)}: added to the supervised
                           loss by the shared objective (training/objective.py)
  predict(model, batch, seen, oracle) -> {"pred", "routed" (None: nothing routes), "oracle_pred"}
  describe()               its shape in the start-of-run parameter line
  bench                    how `python -m delo_dist.bench` times it: recipe overrides for its
                           section at the bench's shape (a dict), or a plugins.BenchEntry that
                           adds its rows, variants and ratios; None: out of the default run
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from delo_dist import dist
from delo_dist.plugins import Plugin


class Method(Plugin):
    needs: ClassVar[dict[str, str]] = {}
    head: ClassVar[str] = "session"
    shared_across_sessions: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    guide_queries: ClassVar[bool] = False
    dummy_image: ClassVar[str] = "backbone"
    targets: ClassVar[Optional[tuple]] = None    # linears to adapt when the recipe names none
    bench: ClassVar[Any] = {}                    # dict / plugins.BenchEntry / None (above)

    def __init__(self, settings: Any = None):
        self.cfg = settings if settings is not None else self.Settings()

    @property
    def uses_identifier(self) -> bool:
        """Whether the model builds the task identifier (`task_id.*`): methods with a head per
        session route by it; a shared-head method may still ask for it (to pick its own
        per-session parts by it)."""
        return self.head == "session"

    def dummies(self) -> dict:
        """What a missing modality becomes at collate time (the backbone applies it)."""
        return {"image": getattr(self.cfg, "dummy_image", self.dummy_image), "text": ""}

    def describe(self) -> str:
        return ""

    # ------------------------------------------------------------ building
    def make_session(self, d_in: int, d_out: int, *, name: str, base: nn.Linear,
                     session: str) -> Optional[nn.Module]:
        """Session `session`'s adapter for the linear `name` (None: the method has none).
        `base` is the frozen linear; a method that needs where a linear sits
        (`backbone.linear_site`) reads it in its select_linears (not every backbone linear
        has a site)."""
        return None

    def select_linears(self, backbone, targets: Optional[list]) -> dict[str, nn.Linear]:
        """The linears to adapt: the recipe's targets, else the method's, else the backbone's."""
        return backbone.adapted_linears(targets or (list(self.targets) if self.targets else None))

    def attach(self, model) -> None:
        """Wrap the chosen linears of `model.backbone` in session-partitioned adapters."""
        from delo_dist.models.adapters import AdaptedLinear
        if not self.has_adapters():
            return
        n = model.n_sessions
        names = ["shared"] * n if self.shared_across_sessions else [str(k) for k in range(n)]
        for name, linear in self.select_linears(model.backbone, model.recipe_targets).items():
            make = (lambda s, name=name, linear=linear: self.make_session(
                linear.in_features, linear.out_features, name=name, base=linear, session=s))
            wrapped = AdaptedLinear(linear, model.ctx, make, names)
            model.backbone.replace_linear(name, wrapped)
            model.adapted.append(wrapped)

    def has_adapters(self) -> bool:
        """Whether the method wraps linears (it overrides make_session)."""
        return type(self).make_session is not Method.make_session

    def own_parameters(self, model, k: int):
        """What of the method's own parts trains in session k (its head aside): its adapters."""
        return (p for a in model.adapted for p in a.session_module(k).parameters())

    def session_parameters(self, model, k: int) -> dict[str, nn.Parameter]:
        """Session k's trainable tensors, by name: the method's own (`own_parameters`) and its
        head."""
        wanted = {id(p) for p in self.own_parameters(model, k)}
        wanted |= {id(p) for p in model.heads[k].parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) in wanted}

    # ------------------------------------------------------------ training
    def start_session(self, model, k: int) -> None:
        """Before session k trains (not on a mid-session resume, whose checkpoint holds its
        state): e.g. initialise session k's slice orthogonally to the trained earlier ones."""

    def forward(self, model, batch: dict, session: int, epoch: int = 0, aux: bool = True) -> dict:
        """Logits of the batch over session `session`'s classes, and what `loss_terms` reads
        (aux=False: the terms will not be taken; skip what only they need)."""
        return {"logits": model.session_forward(batch, session)}

    def loss_terms(self, model, batch: dict, out: dict, session: int) -> dict[str, tuple]:
        return {}

    # ------------------------------------------------------------ inference
    def predict(self, model, batch: dict, seen: int, oracle: bool = True) -> dict:
        """Task-agnostic prediction: each sample routed by the task identifier to a session's
        adapters and head (the continual model's default path)."""
        return model.predict_routed(batch, seen, oracle)


def complete_scale(batch: dict, complete: torch.Tensor) -> float:
    """world / (complete samples per micro-step over all ranks): a term summed over this rank's
    complete samples, times this, averages over the global batch's complete samples once the
    ranks' gradients are averaged. With gradient accumulation the stream counted the optimizer
    step's whole global batch (/ accum), so the micro-steps' terms, each divided by accum in
    backward, add up to the step's mean."""
    if "complete_per_micro" in batch:
        n_global = float(batch["complete_per_micro"][0])
    else:
        n_global = dist.all_reduce_sum(complete.sum().float().cpu()).item()
    return dist.world() / n_global if n_global > 0 else 0.0  # n may be < 1 with accumulation
