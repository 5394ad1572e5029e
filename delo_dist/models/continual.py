"""The continual model: a frozen backbone, the method's per-session parts (adapters,
prompts, ...), a head per session, and the task identifier. Training runs one known session;
inference is the method's (`Method.predict`): by default each sample is routed to a session by
the task identifier (`task_id.source`, delo_dist/models/task_id.py), or, for analysis only,
by its true session (`oracle`); shared-head methods predict over every seen class instead
(`predict_shared`). The identifier sits at `self.identifier` (None for shared-head methods;
its buffers are checkpointed under that prefix).
"""
from __future__ import annotations

import torch
from torch import nn

from delo_dist.config import plugin_class
from delo_dist.models.adapters import PROXY_NONE, AdaptedLinear, RoutingContext, masked_mean
from delo_dist.models.backbone import build_backbone
from delo_dist.models.inputs import concat_batches, subset
from delo_dist.models.task_id import TaskIdentifier, build_task_identifier


def parameter_summary(model: "ContinualModel") -> dict:
    """The start-of-run summary: `parameter_counts` (one counting rule, by identity, as the
    optimizer sees the tensors) seen from session 0 (all sessions are built alike), with
    the plug-in names and the number of adapted linears."""
    counts = model.parameter_counts()
    frozen, s0 = counts["backbone_frozen"], (counts["sessions"] or [None])[0]
    return {
        "backbone": model.plugins[0], "method": model.plugins[1], "backbone_params": frozen,
        "adapted_linears": len(model.adapted),
        "trainable_per_session": s0["trainable"] if s0 else 0,
        "adapter_params_per_session": s0["adapters"] if s0 else 0,
        "trainable_all_sessions": counts["total"] - frozen,
        "trainable_percent": 100.0 * s0["trainable"] / max(frozen, 1) if s0 else 0.0,
    }


class ContinualModel(nn.Module):
    def __init__(self, recipe, session_classes: list[list[int]], num_classes: int,
                 multilabel: bool = False):
        super().__init__()
        self.ctx = RoutingContext()
        self.method = plugin_class(recipe.method)(recipe.method.settings)
        self.backbone = build_backbone(recipe.backbone, self.ctx)
        self.backbone.dummy_image = self.method.dummies()["image"]
        self.backbone.guide_queries = bool(self.method.guide_queries)
        self.multilabel = multilabel
        self.num_classes = num_classes
        self.plugins = (recipe.backbone.name, recipe.method.name)
        self.n_sessions = len(session_classes)
        self.recipe_targets = recipe.backbone.targets   # linears to adapt (null: the method's)
        self.session_classes = [list(c) for c in session_classes]
        self.adapted: list[AdaptedLinear] = []
        self.method.attach(self)
        self.merged_inference = self.method.mergeable  # MoRA: inference with merged weights
        d = self.backbone.hidden_size
        self.heads = nn.ModuleList([nn.Linear(d, len(c)) for c in session_classes])
        self.identifier = (build_task_identifier(recipe.task_id, session_classes, num_classes,
                                                 self.backbone)
                           if self.method.uses_identifier else None)
        n = self.n_sessions
        # global class id -> index inside its session's head (-1: not in this session)
        local = torch.full((n, num_classes), -1, dtype=torch.long)
        for k, classes in enumerate(session_classes):
            local[k, torch.tensor(classes)] = torch.arange(len(classes))
        self.register_buffer("local_index", local, persistent=False)
        # First-layer task keys are read inside the main forward (no second pass): a hook on
        # the module whose output they average routes the batch before any adapter acts.
        self._route_seen: int | None = None     # set by predict: route in the forward
        self._first_layer = None                # (input_ids of the forward's main rows, q)
        self.last_identification = None         # (features, flags, seen, scores|None): identify
        self.last_head_logits = None            # {k: (rows, logits)} of the last predict_with
        self._main_ids = None                   # set while a forward runs
        # Sources that need the adapter-free pooled feature pay a separate pass instead.
        hooked = (self.backbone.first_layer_module()
                  if self.identifier is not None and not self.identifier.needs_pooled else None)
        self._hooked = hooked is not None
        if hooked is not None:
            hooked.register_forward_hook(self._on_first_layer)
        self.backbone.train(True)  # the backbone's own modes, once: it keeps its model frozen

    def train(self, mode: bool = True):
        """Mode flags on the model and its own parts (heads, identifier, method modules). The
        backbone keeps its frozen model, and the adapters wrapped inside it, in eval mode
        whatever the mode (set once at build): walking the thousands of per-session adapter
        modules at every step would make the step cost grow with the number of sessions."""
        self.training = self.backbone.training = mode
        for child in self.children():
            if child is not self.backbone:
                child.train(mode)
        return self

    # ------------------------------------------------------------ parameters
    def session_parameters(self, k: int) -> dict[str, nn.Parameter]:
        """Session k's trainable tensors, by name (the method decides)."""
        return self.method.session_parameters(self, k)

    def parameter_counts(self) -> dict:
        """Parameter counts: the frozen backbone (adapters excluded) and, per session, what it
        trains (its head and the rest: adapters, prompts). Shared parts (seq_lora) count in
        every session; by identity (MoRA's shared factors sit in a text and an image linear)."""
        per = [self.session_parameters(k) for k in range(self.n_sessions)]
        learned = {id(p) for a in self.adapted for p in a.sessions.parameters()}
        learned |= {id(p) for d in per for p in d.values()}
        backbone = sum(p.numel() for p in self.backbone.parameters() if id(p) not in learned)
        sessions = []
        for k, params in enumerate(per):
            head_ids = {id(p) for p in self.heads[k].parameters()}
            n_head = sum(p.numel() for p in params.values() if id(p) in head_ids)
            total = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
            sessions.append({"adapters": total - n_head, "head": n_head, "trainable": total})
        return {"backbone_frozen": backbone, "sessions": sessions,
                "total": sum(p.numel() for p in self.parameters())}

    def set_trainable(self, k: int) -> dict[str, nn.Parameter]:
        self.requires_grad_(False)
        params = self.session_parameters(k)
        for p in params.values():
            p.requires_grad_(True)
        return params

    # ------------------------------------------------------------ forward
    def set_batch(self, batch: dict, record: bool = False, proxy=None) -> None:
        """The routing context for one forward over `batch` (missing flags, caches cleared)."""
        c = self.ctx
        c.missing_text, c.missing_image = batch["missing_text"], batch["missing_image"]
        c.proxy, c.record, c.queries = proxy, record, []
        c.cached_input = c.cached_queries = c.cached_routes = c.session_groups = None
        self._first_layer = None

    def forward(self, batch: dict, session: int, epoch: int = 0, aux: bool = True) -> dict:
        """Training forward on one session (the method's): {"logits": (B, classes of
        `session`), ...what its loss terms read}; aux=False: the terms will not be taken."""
        return self.method.forward(self, batch, session, epoch, aux)

    def session_forward(self, batch: dict, session: int, record: bool = False,
                        proxy_rows: tuple | None = None) -> torch.Tensor:
        """Logits over session `session`'s classes with its adapters and head.
        proxy_rows (idx, proxy): rows idx again after the batch, with proxy[j] simulating a
        missing modality (DeLo's L_con pass, batched with the main one): (B + len(idx)) rows."""
        main, proxy = batch, None
        if proxy_rows is not None and len(proxy_rows[0]):
            idx, extra = proxy_rows
            batch = concat_batches([batch, subset(batch, idx)])
            proxy = torch.cat([torch.full((len(main["missing_text"]),), PROXY_NONE,
                                          device=extra.device, dtype=extra.dtype), extra])
        self.set_batch(batch, record, proxy)
        self.ctx.uniform_session, self.ctx.session = session, None
        return self.heads[session](self.run_backbone(batch, main))

    def run_backbone(self, batch: dict, main: dict | None = None) -> torch.Tensor:
        """The backbone's pooled feature (B, hidden_size) with the context as set."""
        self._main_ids = (main or batch)["input_ids"]  # the first-layer hook acts in this call
        try:
            return self.backbone(batch)
        finally:
            self._main_ids = None

    @torch.no_grad()
    def _on_first_layer(self, module, inputs, out: torch.Tensor) -> None:
        """Keeps the forward's first-layer queries (identification_features reuses them)
        and, when predict asks, routes every sample to a session before the adapters run."""
        c = self.ctx
        if not c.enabled or self._main_ids is None:
            return  # an adapter-free pass, or a call outside forward (first_layer_queries)
        q_v, q_t = masked_mean(out, c.image_tokens).float(), masked_mean(out, c.text_tokens).float()
        n_v = c.image_tokens.sum(1, keepdim=True).float()
        n_t = c.text_tokens.sum(1, keepdim=True).float()
        feats = {"q_v": q_v, "q_t": q_t,   # as Backbone.identification_features computes them
                 "q_all": (n_v * q_v + n_t * q_t) / (n_v + n_t).clamp(min=1)}
        self._first_layer = (self._main_ids, feats)
        if self._route_seen is not None:
            flags = {"missing_image": c.missing_image, "missing_text": c.missing_text}
            routed = self.identify(feats, flags, self._route_seen)
            uniq = routed.unique()
            c.session, c.session_groups = routed, None
            c.uniform_session = int(uniq[0]) if len(uniq) == 1 else None

    @torch.no_grad()
    def identification_features(self, batch: dict) -> dict:
        """The adapter-free features the task identifier reads. The first-layer ones come
        from this batch's own forward pass when one just ran (the hook kept them)."""
        cached = self._first_layer
        pooled = self.identifier is not None and self.identifier.needs_pooled
        if not pooled and cached is not None and cached[0] is batch["input_ids"]:
            n = len(batch["input_ids"])
            return {name: q[:n] for name, q in cached[1].items()}
        self.set_batch(batch)
        layers = getattr(self.identifier, "layers", ())
        return self.backbone.identification_features(batch, pooled=pooled, layers=layers)

    @torch.no_grad()
    def route(self, batch: dict, seen: int) -> torch.Tensor:
        """(B,) session of each sample among the first `seen`, without its session id."""
        return self.identify(self.identification_features(batch), batch, seen)

    def identify(self, feats: dict, flags: dict, seen: int) -> torch.Tensor:
        """The identifier's routes; what it read is kept (`last_identification`: features,
        flags, seen and, where the route is the argmax of its scores, those scores) so that
        prediction reports its confidence without a second identification pass or scoring.
        predict identifies under the training's autocast: the kept scores are the ones the
        route took (fp32 on CPU; in bf16/fp16 they may differ in the last bits from an fp32
        re-score of the features)."""
        ident = self.identifier
        if type(ident).route is TaskIdentifier.route:   # the best-scoring session: score once
            scores = ident.scores(feats, flags, seen)
            self.last_identification = (feats, flags, seen, scores)
            return scores.argmax(1)
        self.last_identification = (feats, flags, seen, None)   # its own route: scored later
        return ident.route(feats, flags, seen)

    @torch.no_grad()
    def predict_with(self, batch: dict, sessions: torch.Tensor | None) -> torch.Tensor:
        """Predictions when sample b uses session sessions[b]'s adapters and head.
        Single-label: (B,) global class ids. Multi-label: (B, num_classes) bool.
        sessions=None: the first-layer hook routes them (see predict); ctx.session then.
        Each head's logits are kept, with the rows it scored (`last_head_logits`: session ->
        (row indices, logits)), for prediction's probabilities."""
        uniq = None if sessions is None else sessions.unique()
        # Mergeable methods (MoRA) run merged when the batch routes to one session. A mixed
        # batch takes the activation path in one pass (each adapted linear applies each
        # session's update to its samples): one backbone pass per session's sub-batch,
        # merged, was slower (bench --clip).
        if self.merged_inference and uniq is not None and len(uniq) == 1:
            pooled = self._merged_pooled(batch, int(uniq[0]))
        else:
            self.set_batch(batch)
            self.ctx.session = sessions
            self.ctx.uniform_session = int(uniq[0]) if uniq is not None and len(uniq) == 1 else None
            pooled = self.run_backbone(batch)
        if sessions is None:
            sessions = self.ctx.session
            if sessions is None:
                raise RuntimeError("task identification in the forward pass: the first-layer "
                                   "hook did not run (backbone.first_layer_module())")
            uniq = sessions.unique()
        n = pooled.shape[0]
        pred = (torch.zeros(n, self.num_classes, dtype=torch.bool, device=pooled.device)
                if self.multilabel else torch.zeros(n, dtype=torch.long, device=pooled.device))
        self.last_head_logits = {}
        for k in uniq.tolist():
            idx = (sessions == k).nonzero().squeeze(1)
            logits = self.heads[k](pooled[idx])
            self.last_head_logits[k] = (idx, logits)
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
        self.set_batch(batch)
        self.ctx.merged, self.ctx.uniform_session = k, k
        try:
            return self.backbone(batch)
        finally:
            self.ctx.merged = None

    @torch.no_grad()
    def predict(self, batch: dict, seen: int, oracle: bool = True) -> dict:
        """Task-agnostic prediction (the headline) over the first `seen` sessions, the session
        each sample was routed to (None where the method routes nothing) and, if asked, the
        oracle prediction (true session id): the method's (`Method.predict`)."""
        return self.method.predict(self, batch, seen, oracle)

    @torch.no_grad()
    def predict_routed(self, batch: dict, seen: int, oracle: bool = True) -> dict:
        """Each sample routed by the task identifier to a session's adapters and head; oracle
        predictions recomputed only for samples routed elsewhere than their true session."""
        if self._hooked:
            self._route_seen = seen  # routed inside the forward: no identification pass
            try:
                pred = self.predict_with(batch, None)
            finally:
                self._route_seen = None
            routed = self.ctx.session
        else:
            routed = self.route(batch, seen)
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

    def shared_columns(self, seen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared head's columns over the first `seen` sessions: classes (C,) their global
        ids and owner (C,) their session. Sessions sit side by side in order, so these are
        prefixes of the all-sessions tensors, built once per device."""
        flat = self.__dict__.get("_shared_flat")
        if flat is None or flat[0].device != torch.device(device):
            classes = torch.tensor([c for cs in self.session_classes for c in cs], dtype=torch.long)
            owner = torch.cat([torch.full((len(cs),), k, dtype=torch.long)
                               for k, cs in enumerate(self.session_classes)])
            ends = [0]
            for cs in self.session_classes:
                ends.append(ends[-1] + len(cs))
            self.__dict__["_shared_flat"] = flat = (classes.to(device), owner.to(device), ends)
        n = flat[2][seen]
        return flat[0][:n], flat[1][:n]

    def shared_logits(self, pooled: torch.Tensor, seen: int,
                      sessions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared head's logits (B, C) (float32) from pooled features (B, d): one linear
        head over every class of the first `seen` sessions (the per-session heads side by side:
        each session's block trains only in its session, as masked logits train one head), and
        classes (C,), the global id of each column. sessions (B,): every class outside a row's
        session at -inf (the oracle; `restrict_logits`)."""
        logits = torch.cat([self.heads[k](pooled) for k in range(seen)], -1).float()
        classes, _ = self.shared_columns(seen, pooled.device)
        if sessions is not None:
            logits = self.restrict_logits(logits, seen, sessions)
        return logits, classes

    def restrict_logits(self, logits: torch.Tensor, seen: int, sessions: torch.Tensor) -> torch.Tensor:
        """Shared-head logits (B, C) with every class outside row b's session sessions[b] at -inf."""
        _, owner = self.shared_columns(seen, logits.device)
        return logits.masked_fill(owner[None, :] != sessions.to(logits.device)[:, None], float("-inf"))

    def shared_prediction(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Prediction from shared-head logits (`shared_logits`): the argmax class (multi-label:
        a (B, num_classes) bool of sigmoid > 0.5)."""
        if self.multilabel:
            hot = torch.zeros(len(logits), self.num_classes, dtype=torch.bool, device=logits.device)
            hot[:, classes] = logits.sigmoid() > 0.5
            return hot
        return classes[logits.argmax(-1)]

    @torch.no_grad()
    def predict_shared(self, pooled: torch.Tensor, seen: int,
                       sessions: torch.Tensor | None = None) -> torch.Tensor:
        """Shared-head prediction from pooled features (B, d): argmax over every class of the
        first `seen` sessions (multi-label: sigmoid > 0.5); sessions (B,): restrict each row to
        its session's classes instead (the oracle). See `shared_logits`."""
        return self.shared_prediction(*self.shared_logits(pooled, seen, sessions))
