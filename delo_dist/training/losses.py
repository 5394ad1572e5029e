"""The training objective (paper, Eq. 9 and 10): L = L_c + lambda1 L_align + lambda2 L_con.

L_c: cross-entropy over the active session's head (BCE for multi-label data).
L_align = 1 - cos(q_v, q_t), on complete samples, averaged over the adapted linears.
L_con: KL(p_true || p_proxy) on complete samples, where p_proxy comes from a second forward
  in which one modality's pools are routed by the other modality's query, as they would be
  if that modality were missing. Which one is simulated is drawn per sample from its key
  (so the choice does not depend on the number of ranks). p_true is the target and is
  detached: the proxy path is taught to reason like the real one, not the reverse.
The auxiliary terms are sums over this rank's complete samples divided by the global count
/ world: after the ranks' gradients are averaged, each is the mean over all complete
samples of the global batch, whatever their split across ranks.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from delo_dist import dist
from delo_dist.models.adapters import PROXY_IMAGE, PROXY_TEXT


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


def alignment_sum(queries: list, complete: torch.Tensor) -> torch.Tensor:
    """Sum over complete samples of mean over linears of (1 - cos(q_v, q_t))."""
    per_sample = torch.stack([1 - F.cosine_similarity(qv, qt, dim=-1) for qv, qt in queries]).mean(0)
    return per_sample[complete].sum()


def proxy_choice(keys: list[str], epoch: int) -> torch.Tensor:
    """Per sample, which modality the consistency pass pretends is missing."""
    return torch.tensor([PROXY_TEXT if zlib.crc32(f"{k}/{epoch}".encode()) % 2 == 0 else PROXY_IMAGE
                         for k in keys])


def consistency_sum(logits_true: torch.Tensor, logits_proxy: torch.Tensor,
                    multilabel: bool) -> torch.Tensor:
    target = logits_true.detach()
    if multilabel:  # KL between per-class Bernoulli distributions, summed over classes
        p, lp, lq = target.sigmoid(), F.logsigmoid(target), F.logsigmoid(logits_proxy)
        l1p, l1q = F.logsigmoid(-target), F.logsigmoid(-logits_proxy)
        return (p * (lp - lq) + (1 - p) * (l1p - l1q)).sum(-1).sum()
    return F.kl_div(logits_proxy.log_softmax(-1), target.log_softmax(-1), log_target=True,
                    reduction="sum")


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
