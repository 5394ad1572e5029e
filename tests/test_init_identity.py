"""Every method whose update starts at zero gives, at initialisation, the frozen backbone's
output exactly: the adapted model (adapters on, per-session and mixed-session routing, the
training forward with dropout) against the same model with `ctx.enabled=False`, on tiny
random ViLT and CLIP. B = 0 makes each delta exactly zero (y + 0 == y), but the tiny ViLT's
own forward is not bit-reproducible on CPU: two runs of the same frozen forward differ by up
to ~5e-7 here (BLAS picks kernels by memory alignment). So features (tanh-pooled, |x| <= 1)
and logits are compared to 1e-5, twenty times that noise and far below what an adapter
moves (the last check: > 1e-2 once B is non-zero; MoRA's start moves them by O(1)).
MoRA does not start at the frozen model (tests/test_mora.py pins its start)."""
from __future__ import annotations

import pytest
import torch

from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel

BACKBONES = {"vilt": {}, "clip": {"backbone.name": "clip", "backbone.tiny.text_hidden_size": 24}}
METHODS = ["delo", "lora", "seq_lora", "mail", "seq_mail"]
TOL = 1e-5


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=TOL)


def pooled(model, batch, sessions=None, enabled=True) -> torch.Tensor:
    """Evaluation forward: every sample on session 0, or sample b on sessions[b]."""
    model.eval()
    model.set_batch(batch)
    model.ctx.session = sessions
    model.ctx.uniform_session = 0 if sessions is None else None
    model.ctx.enabled = enabled
    try:
        with torch.no_grad():
            return model.backbone(batch)
    finally:
        model.ctx.enabled = True


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_adapted_model_equals_the_frozen_one_at_initialisation(recipe_for, shards, method, backbone):
    recipe = recipe_for(**{"method.name": method, **BACKBONES[backbone]})
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(0)
    model = ContinualModel(recipe, [s["classes"] for s in m["sessions"]], m["num_classes"])
    assert model.adapted, "the method adapted no linear"
    table = missing_table(m["sessions"][0]["splits"]["train"]["keys"], MissingSpec(0.5, "both", 0.5),
                          0, "train")
    batch = next(iter(SessionStream(shards, m, 0, "train", 12, model.backbone.collate, table,
                                    train=False)))
    assert batch["missing_text"].any() and batch["missing_image"].any()
    frozen = pooled(model, batch, enabled=False)
    assert same(pooled(model, batch), frozen)
    assert same(pooled(model, batch, sessions=torch.arange(12) % 3), frozen)
    # the training forward (gradients on, LoRA dropout active): the same logits
    model.set_trainable(0)
    model.train()
    assert same(model.session_forward(batch, 0), model.heads[0](frozen))
    # and the adapters do act: once B moves, the output moves
    with torch.no_grad():
        for a in model.adapted:
            for name, p in a.session_module(0).named_parameters():
                if name.endswith("B"):
                    p.normal_(0, 0.5)
    assert (pooled(model, batch) - frozen).abs().max() > 1e-2
