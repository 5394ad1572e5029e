"""A method that lives only here, to prove that a plug-in is one file (README "Adding a
method"): per session, a learned bias added to the output of every adapted linear (BitFit,
"BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
arXiv 2106.10199, made continual: the frozen backbone's own biases stay, each session adds
its own). A recipe loads it with `plugins: [tests/plugins/bitfit.py]`, then `method.name: bitfit`
and its section `method.bitfit.*`. Nothing else in the repository names it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from delo_dist.models.method import Method
from delo_dist.plugins import register


@dataclass
class BitFitSettings:
    init_std: float = 0.0            # 0: every session starts at the frozen model

    def validate(self, check) -> None:
        check(self.init_std >= 0, "init_std", "a float >= 0", self.init_std)


class SessionBias(nn.Module):
    uses_queries = False             # the same shift for every input: no routing queries

    def __init__(self, d_out: int, std: float):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_out) * std)

    def delta(self, x, q_v=None, q_t=None, q_all=None, naive: bool = False):
        return self.bias.expand(x.shape[0], x.shape[1], -1)    # (B, N, d_out)


class BitFit(Method):
    name = "bitfit"
    Settings = BitFitSettings
    bench = {"method.bitfit.init_std": 0.0}

    def describe(self) -> str:
        return f"a bias per adapted linear, init std {self.cfg.init_std}"

    def make_session(self, d_in, d_out, **_):
        return SessionBias(d_out, self.cfg.init_std)


register("method", BitFit)
