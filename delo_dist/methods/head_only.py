"""Lower bound: the frozen backbone and a new linear head per session, nothing else."""
from __future__ import annotations

from delo_dist.models.method import Method


class HeadOnly(Method):
    name = "head_only"
