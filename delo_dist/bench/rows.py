"""Rows from the plug-ins' bench entries (`bench` of a method or backbone class: a dict of
recipe overrides or a delo_dist.plugins.BenchEntry with its rows, variants and ratios).

Every model is the project's model, built from a recipe (defaults, the bench's shape, the
plug-in's overrides, --set, then a variant's overrides) under one seed, hence the same frozen
backbone weights for every row. Its batch comes from its backbone's own `collate` (the
method's dummies included) over photo-like JPEGs and sentences (delo_dist/data/throughput.py):
sample i belongs to session i % S and is complete, text-missing, complete, image-missing for
i % 4 = 0, 1, 2, 3 (half complete).

Row kinds, each row named `<kind>/<stem>` (stem: the plug-in, or `<plug-in>_<variant>`):
  train        the trainer's step: forward, the method's whole objective (L_c + its loss
               terms, training/objective.py), backward, AdamW over `set_trainable(k)`'s
               tensors, the identifier's per-step update
  train_ce     the same step on L_c alone (the adapter step)
  oracle       `predict_with(batch, true sessions)`: each sample on its own session's parts
  one_session  the same on a batch that is all one session (a mergeable method merges)
  agnostic     `predict(batch, seen, oracle=False)`: task-agnostic, the headline path; the
               identifier is first fitted on the batch through its own protocol (observe,
               fit), session k from the session-k samples
  frozen       the backbone alone (no method), under no_grad
Methods with a head per session get train, oracle and agnostic unless their entry says;
shared-head methods train and agnostic; backbones frozen.

`frozen_forwards` of a row: the multiply-adds of the backbone's own linears in the forward
passes of one call, in units of a frozen forward of as many samples (backward not counted):
what a call costs in backbone passes, and why (a frozen query pass, a proxy pass over the
complete samples, a memory pass, longer sequences from prompts).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from delo_dist.bench.harness import Harness, Row, rss_mb
from delo_dist.config import load_recipe, plugin_class
from delo_dist.data.shards import encode_jpeg
from delo_dist.data.throughput import photo, sentence
from delo_dist.models.adapters import RoutingContext
from delo_dist.models.backbone import build_backbone
from delo_dist.models.continual import ContinualModel
from delo_dist.models.inputs import subset
from delo_dist.plugins import BenchEntry, BenchVariant, load_symbol
from delo_dist.training.evaluation import to_device
from delo_dist.training.objective import objective, observe_task_id

CLASSES_PER_SESSION = 4
KINDS = ("train", "train_ce", "oracle", "one_session", "agnostic", "frozen")


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)   # YAML reads JSON scalars and lists


resolve = load_symbol   # "module:function" -> the function (bench/loader.py's name for it)


@dataclass
class Setup:
    """The run's fixed choices."""
    backbone: str
    shape: dict          # dotted recipe key -> value: the bench's shape
    user: list           # --set KEY=VALUE, applied to every model
    batch: int
    sessions: int
    device: str
    seed: int

    def recipe(self, plugin: dict, variant: dict | None = None, method: str | None = None):
        items = {"data.make_synthetic": True, "backbone.name": self.backbone, **self.shape}
        if method is not None:
            items["method.name"] = method
        items.update(plugin)
        overrides = [f"{k}={_value(v)}" for k, v in items.items()] + list(self.user)
        overrides += [f"{k}={_value(v)}" for k, v in (variant or {}).items()]  # a variant's own
        return load_recipe(None, overrides)

    def samples(self, n: int) -> list[dict]:
        """n samples as the shards hold them (the backbone's collate decodes them)."""
        rng = np.random.default_rng(self.seed + 2)
        S, image_size = self.sessions, self.shape.get("backbone.image_size", 64)
        return [{"key": f"bench-{i}", "jpg": encode_jpeg(photo(rng, image_size, image_size)),
                 "txt": sentence(rng), "label": (i % S) * CLASSES_PER_SESSION + i % CLASSES_PER_SESSION,
                 "session": i % S, "status": (0, 1, 0, 2)[i % 4]} for i in range(n)]


def fresh(batch: dict) -> dict:
    """The batch as new tensor objects (views, no copy): every call sees a batch of its own,
    as in a real loop, so no cache keyed by a batch's tensors (the backbone's frozen pass
    for frozen_query) carries over from one timed call to the next."""
    return {k: v.view_as(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def relabel(batch: dict, k: int) -> dict:
    """The same inputs, every sample in session k (training runs one session)."""
    out = dict(batch)
    out["session"] = torch.full_like(batch["session"], k)
    out["labels"] = k * CLASSES_PER_SESSION + batch["labels"] % CLASSES_PER_SESSION
    return out


def session_classes(sessions: int) -> list[list[int]]:
    C = CLASSES_PER_SESSION
    return [list(range(k * C, (k + 1) * C)) for k in range(sessions)]


def build_model(setup: Setup, recipe, sessions: int) -> ContinualModel:
    torch.manual_seed(setup.seed)  # the same frozen backbone for every model
    return ContinualModel(recipe, session_classes(sessions),
                          sessions * CLASSES_PER_SESSION).to(setup.device)


def build_frozen_backbone(setup: Setup, recipe) -> nn.Module:
    torch.manual_seed(setup.seed)  # built first inside ContinualModel too: the same weights
    backbone = build_backbone(recipe.backbone, RoutingContext()).to(setup.device)
    backbone.train(False)
    return backbone


# ------------------------------------------------------------------ identifier, work

@torch.no_grad()
def fit_identifier(model: ContinualModel, batch: dict, seen: int, newest_only: bool) -> None:
    """Fit the task identifier through its own protocol, as training would: session k from
    the batch's session-k samples (`observe`; then `fit` for sources fitted per session).
    newest_only: the batch is all session seen - 1 and sessions before it get random
    features, so scoring runs over all `seen` sessions and the batch routes to the newest."""
    ident = model.identifier
    if ident is None:
        return
    model.eval()
    real = model.identification_features(batch)
    g = torch.Generator().manual_seed(seen)
    for k in range(seen):
        if newest_only and k < seen - 1:
            sub = relabel(batch, k)
            feats = _map_feats(real, lambda v: torch.randn(v.shape, generator=g).to(v))
        else:
            idx = (batch["session"] == k).nonzero().squeeze(1)
            sub, feats = subset(batch, idx), _map_feats(real, lambda v: v[idx])
        ident.observe(feats, sub, k)
        if ident.fits_per_session:
            ident.fit(k, [sub], [sub], lambda b, f=feats: f)


def _map_feats(feats: dict, fn) -> dict:
    """fn on every feature tensor (the per-layer means are a list of them)."""
    return {n: [fn(t) for t in v] if isinstance(v, list) else fn(v) for n, v in feats.items()}


class LinearWork:
    """Multiply-adds of the frozen backbone's linears (found by name in any model's backbone,
    wrapped by adapters or not) over the forward passes of one call."""

    def __init__(self, frozen_backbone: nn.Module):
        self.macs = {n: m.in_features * m.out_features for n, m in frozen_backbone.named_modules()
                     if isinstance(m, nn.Linear)}

    def probe(self, backbone: nn.Module, info: dict):
        @contextlib.contextmanager
        def counting():
            total, modules = [0], dict(backbone.named_modules())

            def hook(name):
                def count(module, args, out):
                    if args and torch.is_tensor(args[0]):
                        total[0] += args[0].numel() // args[0].shape[-1] * self.macs[name]
                return count
            handles = [modules[n].register_forward_hook(hook(n)) for n in self.macs if n in modules]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                info["linear_macs"] = total[0]
        return counting


def frozen_forwards(rows: dict, frozen_row: str) -> None:
    """Each row's linear_macs in frozen forwards of as many samples (see the module doc)."""
    base = rows.get(frozen_row)
    if not base or not base.get("linear_macs"):
        return
    per_sample = base["linear_macs"] / base["samples"]
    for r in rows.values():
        if "linear_macs" in r:
            r["frozen_forwards"] = r["linear_macs"] / (per_sample * r["samples"])


# ------------------------------------------------------------------ one model's rows

def train_step(model: ContinualModel, batch: dict, k: int, full: bool, extra: dict):
    """The step, and the number of tensors' elements it trains (by identity)."""
    params = dict(model.set_trainable(k))
    for p in extra.values():  # a reference implementation's tensors (BenchVariant.reference)
        p.requires_grad_(True)
    params.update(extra)
    unique = list({id(p): p for p in params.values()}.values())
    opt = torch.optim.AdamW(unique, lr=1e-4, betas=(0.9, 0.98), eps=1e-8)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        b = fresh(batch)
        loss, _ = objective(model, model, b, k, epoch=0, multilabel=model.multilabel,
                            method_terms=full)
        loss.backward()
        opt.step()
        if full:
            observe_task_id(model, b, k)
    return step, sum(p.numel() for p in unique)


def routing(batch: dict):
    def inspect(out: dict) -> dict:
        routed = out.get("routed")
        if routed is None:
            return {}
        true = batch["session"].to(routed.device)
        return {"routed_sessions": len(routed.unique()), "true_sessions": len(true.unique()),
                "routing_accuracy": float((routed == true).float().mean())}
    return inspect


def model_rows(stem: str, kinds: tuple, model: ContinualModel, batch: dict, seen: int,
               newest: bool, extra: dict) -> list[Row]:
    """newest: the batch is all session seen - 1 (trained and routed to)."""
    unknown = [k for k in kinds if k not in KINDS or k == "frozen"]
    if unknown:
        raise ValueError(f"bench entry of {stem!r}: row kinds {unknown}; a method's rows are "
                         f"among {[k for k in KINDS if k != 'frozen']}")
    if not {"oracle", "one_session"}.isdisjoint(kinds) and model.method.head != "session":
        raise ValueError(f"bench entry of {stem!r}: oracle rows need a head per session")
    k = seen - 1 if newest else 0
    trained = relabel(batch, k)
    routed = trained if newest else batch
    B, rows = len(batch["keys"]), []

    def infer(b, fn):
        def call():
            model.eval()
            return fn(fresh(b))
        return call
    for kind in kinds:
        name = f"{kind}/{stem}"
        if kind in ("train", "train_ce"):
            step, n = train_step(model, trained, k, kind == "train", extra)
            rows.append(Row(name, step, B, info={"trainable_params": n}))
        elif kind in ("oracle", "one_session"):
            b = batch if kind == "oracle" else relabel(batch, 0)
            rows.append(Row(name, infer(b, lambda b: model.predict_with(b, b["session"])), B))
        else:  # agnostic
            fit_identifier(model, routed, seen, newest)
            ident = model.identifier
            state = None if ident is None else {n: t.clone() for n, t in ident.state_dict().items()}
            restore = None if ident is None else (lambda: ident.load_state_dict(state))
            rows.append(Row(name, infer(routed, lambda b: model.predict(b, seen, oracle=False)), B,
                            before=restore, inspect=routing(routed)))
    return rows


class RowBuilder:
    """Builds each model of the run and hands its warmed-up rows to the harness."""

    def __init__(self, setup: Setup, harness: Harness):
        self.setup, self.harness, self.work = setup, harness, None  # work: set by backbone()
        self.samples = setup.samples(setup.batch)
        self.cuda = torch.device(setup.device).type == "cuda"
        self.complete_fraction = 0.5

    def start(self) -> tuple[float, int]:
        """The process RSS and GPU memory now, before a model is built (Harness.add)."""
        return rss_mb(), (torch.cuda.memory_allocated() if self.cuda else 0)

    def method(self, name: str, cls, entry: BenchEntry, variants: bool) -> None:
        base = self.setup.recipe(entry.overrides, method=name)
        default = ("train", "oracle", "agnostic") if cls.head == "session" else ("train", "agnostic")
        self.model(name, base, entry.rows or default, BenchVariant(), base)
        for vname, v in (entry.variants.items() if variants else ()):
            recipe = self.setup.recipe(entry.overrides, v.overrides, method=name)
            self.model(f"{name}_{vname}", recipe, v.rows, v, base)

    def model(self, stem: str, recipe, kinds: tuple, v: BenchVariant, entry_recipe) -> None:
        train = tuple(k for k in kinds if k.startswith("train"))
        if train and len(train) < len(kinds) and plugin_class(recipe.method).mergeable:
            # a training step changes the weights, so a mergeable method would merge again at
            # every call of a model that also trains: its inference rows get a model of their own
            self.model(stem, recipe, train, v, entry_recipe)
            kinds = tuple(k for k in kinds if k not in train)
        rss0, resident = self.start()
        seen = v.sessions or self.setup.sessions
        model = build_model(self.setup, recipe, seen)
        model.ctx.naive = v.naive
        if v.merged is not None:
            model.merged_inference = v.merged
        extra = load_symbol(v.reference)(model, entry_recipe) if v.reference else {}
        batch = to_device(model.backbone.collate(self.samples), self.setup.device)
        complete = ~(batch["missing_text"] | batch["missing_image"])
        self.complete_fraction = complete.float().mean().item()
        rows = model_rows(stem, kinds, model, batch, seen, v.sessions is not None, extra)
        for row in rows:
            row.probe = self.work.probe(model.backbone, row.info)
        self.harness.add(rows, rss0, resident)

    def backbone(self, name: str, entry: BenchEntry, variants: bool) -> nn.Module:
        """The frozen backbone's rows (first: every model's work is counted in units of its
        frozen forward); returns the base backbone (the loader rows read with its collate)."""
        out = None
        todo = [(name, None)] + [(f"{name}_{vn}", v) for vn, v in
                                 (entry.variants.items() if variants else ())]
        for stem, v in todo:
            if v is not None and tuple(v.rows) != ("frozen",):
                raise ValueError(f"bench entry of backbone {name!r}: variant rows {v.rows}; "
                                 "a backbone's rows are ('frozen',)")
            rss0, resident = self.start()
            recipe = self.setup.recipe(entry.overrides, v.overrides if v is not None else None)
            backbone = build_frozen_backbone(self.setup, recipe)
            self.work = self.work or LinearWork(backbone)
            batch = to_device(backbone.collate(self.samples), self.setup.device)

            def call(backbone=backbone, batch=batch):
                with torch.no_grad():
                    return backbone(fresh(batch))
            row = Row(f"frozen/{stem}", call, len(self.samples))
            row.probe = self.work.probe(backbone, row.info)
            self.harness.add([row], rss0, resident)
            out = out or backbone
        return out
