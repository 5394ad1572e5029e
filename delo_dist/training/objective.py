"""One training step's objective and task-identifier update, shared by the trainer and the
benchmark, so what is timed is what is trained.

`forward` is whatever runs the model: a DeepSpeed engine, or the model itself. The objective
names no method: the supervised loss over the active session's classes, plus whatever terms
the method adds (`Method.loss_terms`: DeLo's L_align and L_con, MAIL's balance loss, a prompt
method's key-matching loss), each with its weight.
"""
from __future__ import annotations

import torch

from delo_dist.training.losses import supervised_loss


def objective(forward, model, batch: dict, k: int, epoch: int, multilabel: bool = False,
              method_terms: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_c + sum of the method's weighted terms, on session k's batch; the parts as floats
    (each term unweighted, as the paper reports them). method_terms=False: L_c alone (the
    benchmark's reference step)."""
    out = forward(batch, session=k, epoch=epoch, aux=method_terms)
    logits = out["logits"].float()  # under autocast the losses are taken in fp32
    ce = supervised_loss(logits, batch, model.local_index[k], multilabel)
    loss, parts = ce, {"ce": ce.item()}
    terms = model.method.loss_terms(model, batch, out, k) if method_terms else {}
    for name, (weight, value) in terms.items():
        loss = loss + weight * value
        parts[name] = value.item()
    parts["loss"] = loss.item()
    return loss, parts


def observe_task_id(model, batch: dict, k: int) -> None:
    """The task identifier's per-step observation (Eq. 7 for the EMA keys), outside autograd,
    equal on all ranks: the identifier all-reduces sums before dividing. Sources fitted from
    whole-session statistics do nothing here (see `fit` in delo_dist/models/task_id.py), nor
    do methods without an identifier (shared head)."""
    identifier = model.identifier
    if identifier is None or identifier.fits_per_session:
        return
    identifier.observe(model.identification_features(batch), batch, k)
