"""One training step's objective and task-key update, shared by the trainer and the benchmark.

`forward` is whatever runs the model: a DeepSpeed engine, or the model itself.
"""
from __future__ import annotations

import torch

from delo_dist import dist
from delo_dist.training.losses import (alignment_sum, consistency_sum, proxy_choice,
                                       supervised_loss)


def objective(forward, model, batch: dict, k: int, method_cfg, epoch: int,
              multilabel: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_c + lambda1 L_align + lambda2 L_con (paper Eq. 10) on session k's batch.

    L_con's proxy pass rides in the main forward: one pass over [batch; its complete samples
    with a simulated missing modality] (ctx.proxy per row). The backbone is frozen and in eval
    mode, so each row's output is what a separate pass would give (up to float reduction
    order), and the step pays for one larger batch instead of a second forward."""
    m = method_cfg
    routed = model.spec.modality_routed
    use_align = routed and m.lambda_align > 0
    use_con = routed and m.lambda_con > 0 and m.cross_modal_guide
    complete = ~(batch["missing_text"] | batch["missing_image"])
    n = len(complete)
    idx = complete.nonzero().squeeze(1) if use_con else complete.new_zeros(0, dtype=torch.long)
    if len(idx):
        proxy = proxy_choice([batch["keys"][i] for i in idx.tolist()], epoch).to(complete.device)
        both = forward(batch, session=k, record=use_align, proxy_rows=(idx, proxy)).float()
        logits, logits_proxy = both[:n], both[n:]
    else:  # .float(): under autocast the losses are taken in fp32
        logits = forward(batch, session=k, record=use_align).float()
    ce = supervised_loss(logits, batch, model.local_index[k], multilabel)
    loss, parts = ce, {"ce": ce.item()}
    if getattr(m, "mail", None) is not None and m.mail.balance > 0:  # MAIL's optional balance loss
        from delo_dist.models.mail import balance_loss
        balance = balance_loss(model, k)
        if balance is not None:
            loss = loss + m.mail.balance * balance
    # auxiliary terms: this rank's sum over complete samples / (global count / world)
    n_global = _complete_count(batch, complete)
    scale = dist.world() / n_global if n_global > 0 else 0.0  # n may be < 1 with accumulation
    if use_align:  # queries of the main rows only
        queries = [(q_v[:n].float(), q_t[:n].float()) for q_v, q_t in model.ctx.queries]
        align = alignment_sum(queries, complete) * scale
        loss = loss + m.lambda_align * align
        parts["align"] = align.item()
    if use_con:
        con = torch.zeros((), device=logits.device)
        if len(idx):
            con = consistency_sum(logits[idx], logits_proxy, multilabel) * scale
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


def observe_task_id(model, batch: dict, k: int) -> None:
    """The task identifier's per-step observation (Eq. 7 for the EMA keys), outside autograd,
    equal on all ranks: the identifier all-reduces sums before dividing. Sources fitted from
    whole-session statistics do nothing here (see `fit` in delo_dist/models/task_id.py)."""
    if model.identifier.fits_per_session:
        return
    model.identifier.observe(model.identification_features(batch), batch, k)
