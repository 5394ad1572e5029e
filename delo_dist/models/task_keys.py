"""Task-key memory (paper, Eq. 7 and 8): one key per session, no session id at inference.

While session k trains, key_k <- beta * key_k + (1 - beta) * mean(q over the global batch).
The update runs under no_grad with in-place copies, from a batch mean that the trainer has
already averaged over ranks, so every rank holds the same keys (a buffer reassigned inside
forward would not be synced, and DDP's buffer broadcast would fight a second forward).
At inference each sample picks argmax_k cos(q, key_k) over the sessions trained so far.
Keys start at zero: cosine similarity ignores the EMA's start-up shrinkage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskKeyMemory(nn.Module):
    def __init__(self, n_sessions: int, dim: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("keys", torch.zeros(n_sessions, dim))
        self.register_buffer("updates", torch.zeros(n_sessions, dtype=torch.long))

    @torch.no_grad()
    def update(self, session: int, batch_mean: torch.Tensor) -> None:
        self.keys[session].mul_(self.momentum).add_(batch_mean.to(self.keys.dtype),
                                                    alpha=1.0 - self.momentum)
        self.updates[session] += 1

    @torch.no_grad()
    def select(self, q: torch.Tensor, seen: int) -> torch.Tensor:
        """(B, d) queries -> (B,) session ids among the first `seen` sessions."""
        sims = F.cosine_similarity(q.unsqueeze(1).float(), self.keys[:seen].unsqueeze(0), dim=-1)
        return sims.argmax(dim=1)
