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
    if getattr(m, "mail", None) is not None and m.mail.balance > 0:  # MAIL's optional balance loss
        from delo_dist.models.mail import balance_loss
        balance = balance_loss(model, k)
        if balance is not None:
            loss = loss + m.mail.balance * balance
    complete = ~(batch["missing_text"] | batch["missing_image"])
    # auxiliary terms: this rank's sum over complete samples / (global count / world)
    n_global = dist.all_reduce_sum(complete.sum().float().cpu()).item()
    scale = dist.world() / max(n_global, 1.0)
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


def update_task_key(model, batch: dict, k: int) -> None:
    """EMA of the global batch-mean queries per modality, outside autograd, equal on all
    ranks (Eq. 7): sums and counts are all-reduced before the division."""
    q, present = model.key_query(batch)                       # (B, M, d), (B, M)
    w = present.unsqueeze(-1).to(q.dtype)
    packed = torch.cat([(q * w).sum(0), w.sum(0)], dim=-1).float()   # (M, d + 1)
    packed = dist.all_reduce_sum(packed)
    model.task_keys.update(k, packed[:, :-1], packed[:, -1])
