"""The supervised loss every method trains with: cross-entropy over the active session's
classes (BCE for multi-label data). A method's own terms (DeLo's L_align and L_con, a prompt
method's key loss) live in its module and reach the objective through `Method.loss_terms`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supervised_loss(logits: torch.Tensor, batch: dict, local_index: torch.Tensor,
                    multilabel: bool) -> torch.Tensor:
    if multilabel:
        target = torch.zeros_like(logits)
        for i, ids in enumerate(batch["labels"]):
            loc = local_index[torch.tensor(ids, dtype=torch.long)]
            target[i, loc[loc >= 0]] = 1.0
        return F.binary_cross_entropy_with_logits(logits, target)
    target = local_index[batch["labels"].to(logits.device)]
    if (target < 0).any():
        bad = [batch["keys"][i] for i in (target < 0).nonzero().squeeze(1).tolist()]
        raise ValueError(f"samples {bad[:3]} carry labels outside the active session's classes "
                         "(check the manifest's session -> classes)")
    return F.cross_entropy(logits, target)
