"""The continual model: frozen backbone + session-partitioned adapters + one head per
session + the task-key memory. Training runs one known session; inference routes each
sample to a session by its key (or, for analysis only, by its true session: `oracle`).

Which queries feed the task keys (`task_keys.source`):
  - "first_layer" (default): q_v and q_t, the per-modality means of the first layer's
    normalised input, i.e. what DeLo's first routers see. No adapter acts before them, so
    old keys cannot drift as later sessions train, and they cost no extra forward pass.
    Each session keeps a visual and a textual key; a sample missing a modality is routed
    by the modality it has (on the synthetic benchmark a single key sent every text-only
    sample to chance: a dummy image is the same in every session).
  - "frozen_pooled": the backbone's pooled feature with every adapter off, one key per
    session (one extra adapter-free forward per batch).
"""
from __future__ import annotations

import torch
from torch import nn

from delo_dist.models.adapters import AdaptedLinear, RoutingContext
from delo_dist.models.backbone import build_backbone
from delo_dist.models.methods import method_spec
from delo_dist.models.task_keys import TaskKeyMemory


def subset(batch: dict, idx: torch.Tensor) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]
    return out


def parameter_summary(model: "ContinualModel") -> dict:
    """Parameter counts for the start-of-run line and MLflow: the frozen backbone, one
    session's trainable tensors (adapters + head: what `set_trainable(k)` hands the
    optimizer; session 0, all sessions are built alike), and all sessions together."""
    adapter_ids = {id(p) for a in model.adapted for p in a.sessions.parameters()}
    frozen = sum(p.numel() for p in model.backbone.parameters() if id(p) not in adapter_ids)
    per_session = [sum(p.numel() for p in model.session_parameters(k).values())
                   for k in range(len(model.heads))]
    heads = [sum(p.numel() for p in h.parameters()) for h in model.heads]
    return {
        "backbone": model.plugins[0], "method": model.plugins[1], "backbone_params": frozen,
        "adapted_linears": len(model.adapted),
        "trainable_per_session": per_session[0] if per_session else 0,
        "adapter_params_per_session": per_session[0] - heads[0] if per_session else 0,
        "trainable_all_sessions": sum(p.numel() for p in model.parameters()) - frozen,
        "trainable_percent": 100.0 * per_session[0] / max(frozen, 1) if per_session else 0.0,
    }


class ContinualModel(nn.Module):
    def __init__(self, recipe, session_classes: list[list[int]], num_classes: int,
                 multilabel: bool = False):
        super().__init__()
        self.ctx = RoutingContext(cross_modal_guide=recipe.method.cross_modal_guide)
        self.backbone = build_backbone(recipe.backbone, self.ctx)
        self.spec = method_spec(recipe.method)
        self.multilabel = multilabel
        self.num_classes = num_classes
        self.key_source = recipe.task_keys.source
        self.plugins = (recipe.backbone.name, recipe.method.name)
        n = len(session_classes)
        self.adapted: list[AdaptedLinear] = []
        if self.spec.make_session is not None:
            names = ["shared"] * n if self.spec.shared_across_sessions else [str(k) for k in range(n)]
            for name, linear in self._linears(recipe).items():
                wrapped = AdaptedLinear(linear, self.ctx, self._maker(name, linear, names), names)
                self.backbone.replace_linear(name, wrapped)
                self.adapted.append(wrapped)
        self.merged_inference = self.spec.mergeable  # MoRA: inference with merged weights
        d = self.backbone.hidden_size
        self.heads = nn.ModuleList([nn.Linear(d, len(c)) for c in session_classes])
        first = self.key_source == "first_layer"
        self.task_keys = TaskKeyMemory(n, self.backbone.query_dim if first else d,
                                       recipe.task_keys.momentum, modalities=2 if first else 1)
        self.session_classes = [list(c) for c in session_classes]
        # global class id -> index inside its session's head (-1: not in this session)
        local = torch.full((n, num_classes), -1, dtype=torch.long)
        for k, classes in enumerate(session_classes):
            local[k, torch.tensor(classes)] = torch.arange(len(classes))
        self.register_buffer("local_index", local, persistent=False)

    def _linears(self, recipe) -> dict:
        """The recipe's targets, else the method's, else the backbone's; then the method's
        choice of sites (MoRA: upper layers)."""
        spec = self.spec
        linears = self.backbone.adapted_linears(recipe.backbone.targets or spec.targets)
        if spec.keep is not None:
            linears = {n: m for n, m in linears.items() if spec.keep(self.backbone.linear_site(n))}
            if not linears:
                raise ValueError(f"method.name={recipe.method.name}: no linear left to adapt "
                                 "after the method's choice of layers")
        return linears

    def _maker(self, name: str, linear: nn.Linear, session_names: list[str]):
        """make_session(d_in, d_out) for AdaptedLinear; site-aware methods (MoRA couples a text
        and an image linear) also get the site, the base linear and the session name, in the
        order AdaptedLinear builds its modules (one per distinct session name)."""
        if not self.spec.site_aware:
            return self.spec.make_session
        site, order = self.backbone.linear_site(name), iter(dict.fromkeys(session_names))
        return lambda i, o: self.spec.make_session(i, o, site=site, base=linear, session=next(order))

    # ------------------------------------------------------------ parameters
    def session_parameters(self, k: int) -> dict[str, nn.Parameter]:
        """Session k's trainable tensors, by name: its adapters and its head."""
        wanted = {id(p) for a in self.adapted for p in a.session_module(k).parameters()}
        wanted |= {id(p) for p in self.heads[k].parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in wanted}

    def set_trainable(self, k: int) -> dict[str, nn.Parameter]:
        self.requires_grad_(False)
        params = self.session_parameters(k)
        for p in params.values():
            p.requires_grad_(True)
        return params

    # ------------------------------------------------------------ forward
    def _set_batch(self, batch: dict, record: bool = False, proxy=None) -> None:
        c = self.ctx
        c.missing_text, c.missing_image = batch["missing_text"], batch["missing_image"]
        c.proxy, c.record, c.queries = proxy, record, []
        c.cached_input = c.cached_queries = None

    def forward(self, batch: dict, session: int, proxy=None, record: bool = False):
        """Training forward on one session: logits over that session's classes."""
        self._set_batch(batch, record, proxy)
        self.ctx.uniform_session, self.ctx.session = session, None
        return self.heads[session](self.backbone(batch))

    @torch.no_grad()
    def key_query(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Task-key queries (B, M, d) and which of them are real (B, M) bool."""
        if self.key_source == "first_layer":
            q_v, q_t = self.backbone.first_layer_queries(batch)
            present = torch.stack([~batch["missing_image"], ~batch["missing_text"]], 1)
            return torch.stack([q_v, q_t], 1), present.to(q_v.device)
        self.ctx.enabled = False
        try:
            pooled = self.backbone(batch)
        finally:
            self.ctx.enabled = True
        return pooled[:, None], torch.ones(len(pooled), 1, dtype=torch.bool, device=pooled.device)

    @torch.no_grad()
    def predict_with(self, batch: dict, sessions: torch.Tensor) -> torch.Tensor:
        """Predictions when sample b uses session sessions[b]'s adapters and head.
        Single-label: (B,) global class ids. Multi-label: (B, num_classes) bool."""
        uniq = sessions.unique()
        # Mergeable methods run merged when the batch routes to one session. A mixed batch
        # takes the activation path in one pass (each adapted linear applies each session's
        # update to its samples): one backbone pass per session's sub-batch, merged, was
        # slower (bench --clip).
        if self.merged_inference and len(uniq) == 1:
            pooled = self._merged_pooled(batch, int(uniq[0]))
        else:
            self._set_batch(batch)
            self.ctx.session = sessions
            self.ctx.uniform_session = int(uniq[0]) if len(uniq) == 1 else None
            pooled = self.backbone(batch)
        n = pooled.shape[0]
        pred = (torch.zeros(n, self.num_classes, dtype=torch.bool, device=pooled.device)
                if self.multilabel else torch.zeros(n, dtype=torch.long, device=pooled.device))
        for k in uniq.tolist():
            idx = (sessions == k).nonzero().squeeze(1)
            logits = self.heads[k](pooled[idx])
            classes = torch.tensor(self.session_classes[k], device=pooled.device)
            if self.multilabel:
                hot = torch.zeros(len(idx), self.num_classes, dtype=torch.bool, device=pooled.device)
                hot[:, classes] = logits.sigmoid() > 0.5
                pred[idx] = hot
            else:
                pred[idx] = classes[logits.argmax(-1)]
        return pred

    def _merged_pooled(self, batch: dict, k: int) -> torch.Tensor:
        """Pooled features with session k's update merged into the weights (MoRA)."""
        self._set_batch(batch)
        self.ctx.merged, self.ctx.uniform_session = k, k
        try:
            return self.backbone(batch)
        finally:
            self.ctx.merged = None

    @torch.no_grad()
    def predict(self, batch: dict, seen: int, oracle: bool = True) -> dict:
        """Task-agnostic prediction (headline), the routed sessions, and oracle predictions
        (true session id; recomputed only for samples the key memory routed elsewhere)."""
        routed = self.task_keys.select(*self.key_query(batch), seen)
        pred = self.predict_with(batch, routed)
        out = {"routed": routed, "pred": pred}
        if oracle:
            true = batch["session"].to(routed.device)
            oracle_pred = pred.clone()
            wrong = (routed != true).nonzero().squeeze(1)
            if len(wrong):
                oracle_pred[wrong] = self.predict_with(subset(batch, wrong), true[wrong])
            out["oracle_pred"] = oracle_pred
        return out
