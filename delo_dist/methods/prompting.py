"""The prompt methods as plug-ins: what MAP, MSP, L2P, DualPrompt, CODA-Prompt and RebQ share.

Each method module holds its prompt module (prompt_pools.py says what one is) and, at its
bottom, a `PromptMethod` subclass naming it. The plug-in side, the same for all six:
  head     "shared": one linear head over every class seen so far. The model's per-session
           heads side by side are that head (ContinualModel.predict_shared): training session
           k computes only session k's block, which is exactly the shared head with the logits
           of every class outside the session masked (L2P, DualPrompt and CODA-Prompt train so);
           task-agnostic prediction is the argmax over all seen classes (multi-label: sigmoid >
           0.5 over them); the oracle restricts each sample to its true session's classes.
  needs    the prompt capabilities of the positions the settings use ("prompt_input",
           "prompt_prefix"), checked when the recipe loads (`needs_for`).
  attach   builds the prompt module as `model.prompter` (a submodule: checkpoints carry it by
           name, as `prompter.*`) with EVERY session's parts, so that a checkpoint of any session
           loads into a freshly built model; `start_session(model, k)` (the trainer calls it
           before session k trains, never on a mid-session resume) then re-draws session k's
           parts from the trained earlier ones where the method does that (CODA-Prompt and
           RebQ: orthogonal to the earlier slices, from the global torch RNG, which checkpoints
           restore: a resumed run draws what the uninterrupted one drew).
  forward  the frozen query pass (`backbone.frozen_query`, methods that read one) -> the module
           -> one prompted pass (`use_prompts` around `model.run_backbone`) -> session k's block
           of the shared head; the module's loss terms ride in the output (`loss_terms`).
  predict  one prompted pass over the first `seen` sessions' parts -> `model.shared_logits`
           (once; the prediction is read from them, as `model.predict_shared` reads it);
           `routed`: the session a method picks per sample (DualPrompt's E-prompt) or None;
           the oracle also gives such a method each sample's true session's parts (those rows
           are recomputed). The output also carries the shared head's logits over the seen
           classes (`logits`, `oracle_logits`, column i = class `classes[i]`) for probabilities.
  session_parameters(model, k)  the module's (its session-k parts and what it shares) and
           heads[k]: per-session parts are separate tensors, so the optimizer (and ZeRO) never
           holds an earlier session's.
"""
from __future__ import annotations

import re
from typing import ClassVar, Optional

import torch

from delo_dist.models.inputs import subset
from delo_dist.models.method import Method
from delo_dist.models.prompts import use_prompts

CAPABILITY = {"input": "prompt_input", "prefix": "prompt_prefix"}
WHY = {"input": "its prompts are input tokens", "prefix": "its prompts are attention prefixes"}


class PromptMethod(Method):
    head = "shared"
    Module: ClassVar[type]                  # the method's prompt module (map.Map, l2p.L2P, ...)
    reads_query: ClassVar[bool] = True      # its module reads the frozen query pass
    position_keys: ClassVar[tuple] = ("position",)   # Settings fields naming prompt positions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Settings" in cls.__dict__:      # what the defaults need (the class-level answer)
            cls.needs = cls.needs_for(cls.Settings())

    @classmethod
    def needs_for(cls, settings) -> dict[str, str]:
        """The backbone capabilities these settings need: one per prompt position used."""
        used = [getattr(settings, k) for k in cls.position_keys]
        return {CAPABILITY[p]: WHY[p] for p in dict.fromkeys(used)}

    # ------------------------------------------------------------ building
    def attach(self, model) -> None:
        bb = model.backbone
        try:
            module = self.Module(self.cfg, bb.prompt_sites(), bb.frozen_query_dims(),
                                 model.n_sessions)
        except ValueError as e:   # a key of the section: name it as the recipe does
            section = f"method.{self.section_name()}"
            msg = re.sub(r"key '([^']+)'", lambda m: f"key '{section}.{m.group(1)}'", str(e))
            raise ValueError(msg if section in msg else f"{section}: {msg}") from None
        for k in range(model.n_sessions):   # every session's parts exist from the start
            module.start_session(k)
        model.prompter = module

    def start_session(self, model, k: int) -> None:
        model.prompter.start_session(k)

    def own_parameters(self, model, k: int):
        return model.prompter.session_parameters(k)

    # ------------------------------------------------------------ the passes
    def query(self, model, batch: dict) -> Optional[dict]:
        """The frozen query features (None for methods that read none: MAP, MSP)."""
        return model.backbone.frozen_query(batch) if self.reads_query else None

    def prompts(self, model, batch: dict, session: Optional[int] = None, seen: Optional[int] = None,
                task_ids: Optional[torch.Tensor] = None, query: Optional[dict] = None,
                aux: bool = True):
        """The module's PromptOutput for the batch: session k's training forward, or (session
        None) inference over the first `seen` sessions, task_ids choosing per-session parts."""
        if query is None:
            query = self.query(model, batch)
        return model.prompter(query, batch["missing_text"], batch["missing_image"], session,
                              task_ids=task_ids, seen=seen)

    @staticmethod
    def prompted(model, batch: dict, prompts) -> torch.Tensor:
        """Pooled features (B, hidden_size) of one pass under `prompts`."""
        model.set_batch(batch)
        model.ctx.session = model.ctx.uniform_session = None
        with use_prompts(model.ctx, prompts):
            return model.run_backbone(batch)

    def forward(self, model, batch: dict, session: int, epoch: int = 0, aux: bool = True) -> dict:
        out = self.prompts(model, batch, session=session, aux=aux)
        pooled = self.prompted(model, batch, out.prompts)
        return {"logits": model.heads[session](pooled), "prompt_losses": out.losses}

    def loss_terms(self, model, batch: dict, out: dict, session: int) -> dict:
        return dict(out["prompt_losses"])

    # ------------------------------------------------------------ inference
    def identified(self, model, batch: dict, seen: int) -> Optional[torch.Tensor]:
        """(B,) sessions the task identifier gives, for a method that routes its own parts by
        it (`uses_identifier`); None: the method does not."""
        return None

    @torch.no_grad()
    def predict(self, model, batch: dict, seen: int, oracle: bool = True) -> dict:
        # the identifier first: one that reads pooled features runs the frozen pass, which
        # the query then reuses (backbone.frozen_query keeps the last one of this batch)
        task_ids = self.identified(model, batch, seen)
        query = self.query(model, batch)
        out = self.prompts(model, batch, seen=seen, task_ids=task_ids, query=query)
        pooled = self.prompted(model, batch, out.prompts)
        logits, classes = model.shared_logits(pooled, seen)
        res = {"pred": model.shared_prediction(logits, classes), "routed": out.routed,
               "logits": logits, "classes": classes}
        if oracle:
            true = batch["session"].to(pooled.device)
            raw = logits
            if out.routed is not None:   # rows that took another session's parts: redo them
                wrong = (out.routed != true).nonzero().squeeze(1)
                if len(wrong):
                    rows = subset(batch, wrong)
                    sub = None if query is None else {n: q[wrong] for n, q in query.items()}
                    again = self.prompts(model, rows, seen=seen, task_ids=true[wrong], query=sub)
                    pooled = pooled.clone()
                    pooled[wrong] = self.prompted(model, rows, again.prompts).to(pooled.dtype)
                    raw, _ = model.shared_logits(pooled, seen)
            res["oracle_logits"] = model.restrict_logits(raw, seen, true)
            res["oracle_pred"] = model.shared_prediction(res["oracle_logits"], classes)
        return res


def layer_list(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (for describe lines)."""
    runs, out = [], []
    for l in sorted(layers):
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    for a, b in runs:
        out.append(str(a) if a == b else f"{a}-{b}")
    return ", ".join(out)

