"""One training step's objective and task-key update, shared by the trainer and the benchmark.

`forward` is whatever runs the model: a DeepSpeed engine, or the model itself.
"""
from __future__ import annotations

import torch

from delo_dist.models.continual import subset
from delo_dist.training import dist
from delo_dist.training.losses import (alignment_sum, consistency_sum, proxy_choice,
                                       supervised_loss)


def objective(forward, model, batch: dict, k: int, method_cfg, epoch: int,
              multilabel: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_c + lambda1 L_align + lambda2 L_con (paper Eq. 10) on session k's batch."""
    m = method_cfg
    routed = model.spec.modality_routed
    use_align = routed and m.lambda_align > 0
    use_con = routed and m.lambda_con > 0 and m.cross_modal_guide
    logits = forward(batch, session=k, record=use_align)
    ce = supervised_loss(logits, batch, model.local_index[k], multilabel)
    loss, parts = ce, {"ce": ce.item()}
    complete = ~(batch["missing_text"] | batch["missing_image"])
    # auxiliary terms: this rank's sum over complete samples / (global count / world)
    n_global = _complete_count(batch, complete)
    scale = dist.world() / n_global if n_global > 0 else 0.0  # n may be < 1 with accumulation
    if use_align:
        align = alignment_sum(model.ctx.queries, complete) * scale
        loss = loss + m.lambda_align * align
        parts["align"] = align.item()
    if use_con:
        con = torch.zeros((), device=logits.device)
        idx = complete.nonzero().squeeze(1)
        if len(idx):
            sub = subset(batch, idx)
            proxy = proxy_choice(sub["keys"], epoch).to(logits.device)
            con = consistency_sum(logits[idx], forward(sub, session=k, proxy=proxy), multilabel) * scale
        loss = loss + m.lambda_con * con
        parts["con"] = con.item()
    parts["loss"] = loss.item()
    return loss, parts


def _complete_count(batch: dict, complete: torch.Tensor) -> float:
    """Complete samples per micro-step over all ranks. With gradient accumulation the stream
    counted the optimizer step's whole global batch (/ accum), so that the micro-steps'
    auxiliary terms, each divided by accum in backward, add up to the step's mean."""
    if "complete_per_micro" in batch:
        return float(batch["complete_per_micro"][0])
    return dist.all_reduce_sum(complete.sum().float().cpu()).item()


def update_task_key(model, batch: dict, k: int) -> None:
    """The task identifier's per-step observation (Eq. 7 for the EMA keys), outside autograd,
    equal on all ranks: the identifier all-reduces sums before dividing. Sources fitted from
    whole-session statistics do nothing here (see `fit` in delo_dist/models/task_id.py)."""
    if model.task_keys.fits_per_session:
        return
    model.task_keys.observe(model.identification_features(batch), batch, k)
