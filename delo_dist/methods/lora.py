"""Static LoRA of rank r: the DeLo-LoRA ablation (one per session) and sequential
fine-tuning of one shared LoRA (the same module under every session name).

Written here rather than with peft because it must live inside the same session-routed
wrapper as DeLo (per-sample session choice in mixed batches); peft's LoRA is the reference
the benchmark times it against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from delo_dist.models.method import Method
from delo_dist.plugins import BenchEntry, BenchVariant


class LoraSession(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg):
        super().__init__()
        self.alpha = cfg.alpha
        std = cfg.a_init_std if cfg.a_init_std is not None else 1.0 / math.sqrt(d_in)
        self.A = nn.Parameter(torch.randn(cfg.rank, d_in) * std)
        self.B = nn.Parameter(torch.zeros(d_out, cfg.rank))

    uses_queries = False  # static: the same update for every input

    def delta(self, x, q_v=None, q_t=None, q_all=None, naive: bool = False):
        if naive:  # benchmark only: the d_out x d_in update, materialised
            return self.alpha * x @ (self.B @ self.A).t()
        return self.alpha * (x @ self.A.t()) @ self.B.t()


@dataclass
class LoraSettings:
    """method.lora.* (also seq_lora's): DeLo's scale convention, delta = alpha B A x."""
    rank: int = 4
    alpha: float = 2.0
    a_init_std: Optional[float] = None      # None: 1/sqrt(d_in), LoRA-like scale

    def validate(self, check) -> None:
        check(self.rank >= 1, "rank", "an int >= 1", self.rank)


class Lora(Method):
    """DeLo-LoRA: a static rank-r LoRA per session, still task-partitioned and routed by the
    task identifier."""
    name = "lora"
    Settings = LoraSettings
    bench = BenchEntry(  # against peft's LoRA, the same rank, scale and linears
        overrides={"method.lora.rank": 4},
        variants={"peft": BenchVariant({"method.name": "head_only"}, rows=("train", "oracle"),
                                       reference="delo_dist.bench.references:peft_lora")},
        ratios={"train: lora (ours) / peft lora": ("train/lora", "train/lora_peft", None),
                "infer oracle: lora (ours) / peft lora": ("oracle/lora", "oracle/lora_peft", None)})

    def describe(self) -> str:
        return f"r={self.cfg.rank}"

    def make_session(self, d_in, d_out, **_):
        return LoraSession(d_in, d_out, self.cfg)


class SeqLora(Lora):
    """Lower bound: one LoRA fine-tuned session after session (a new head per session)."""
    name = "seq_lora"
    section = "lora"
    shared_across_sessions = True
    bench = None  # costs what lora costs: the same module under every session's name
