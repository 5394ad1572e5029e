"""Task-key memory (paper, Eq. 7 and 8): keys per session, no session id at inference.

Each session keeps M keys, one per query modality (M = 2: visual, textual, when the query
source gives one query per modality; M = 1 for a single pooled query). While session k
trains, key_{k,m} <- beta * key_{k,m} + (1 - beta) * mean of q_m over the global batch's
samples that have modality m. At inference a sample scores each session by the mean of
cos(q_m, key_{k,m}) over the modalities it has, and takes the argmax over the sessions
trained so far. A missing modality does not vote: its query would be a dummy input's, the
same in every session (the cross-modal guide's principle: the available modality decides).
Updates run under no_grad with in-place copies, from sums the trainer has all-reduced, so
every rank holds the same keys. Keys start at zero: cosine ignores the EMA's start-up
shrinkage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskKeyMemory(nn.Module):
    def __init__(self, n_sessions: int, dim: int, momentum: float = 0.99, modalities: int = 1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("keys", torch.zeros(n_sessions, modalities, dim))
        self.register_buffer("updates", torch.zeros(n_sessions, modalities, dtype=torch.long))

    @torch.no_grad()
    def update(self, session: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """sums (M, d): per-modality sums of queries over the global batch; counts (M,)."""
        for m in range(self.keys.shape[1]):
            if counts[m] > 0:
                mean = (sums[m] / counts[m]).to(self.keys.dtype)
                self.keys[session, m].mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
                self.updates[session, m] += 1

    @torch.no_grad()
    def select(self, q: torch.Tensor, present: torch.Tensor, seen: int) -> torch.Tensor:
        """q (B, M, d), present (B, M) bool -> (B,) session ids among the first `seen`."""
        sims = F.cosine_similarity(q.unsqueeze(1).float(), self.keys[:seen].unsqueeze(0), dim=-1)
        weight = present.unsqueeze(1).float()                          # (B, 1, M)
        score = (sims * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)  # (B, seen)
        return score.argmax(dim=1)
