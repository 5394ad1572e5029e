"""Each optimised path against the plain one, numerically: SDPA vs eager ViLT attention,
both modality pools in one gathered product vs pool by pool, L_con's proxy pass batched
with the main pass vs a second forward, and task identification inside the main forward vs
a separate key pass (with 10 sessions)."""
from __future__ import annotations

import copy

import pytest
import torch

from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel
from delo_dist.models.inputs import subset
from delo_dist.methods.delo import DeloSession
from delo_dist.models.vilt_sdpa import ViltSdpaSelfAttention, install_attention
from delo_dist.methods.delo import alignment_sum, consistency_sum, proxy_choice
from delo_dist.training.losses import supervised_loss
from delo_dist.training.objective import objective, observe_task_id
from tests.test_delo import batch_of, build


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.adapted:
            for p in a.sessions.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_sdpa_attention_equals_eager_with_adapters_and_padding(recipe_for, shards):
    recipe, m, model = build(recipe_for)
    attn = [mod for mod in model.modules() if "SelfAttention" in type(mod).__name__]
    assert attn and all(isinstance(a, ViltSdpaSelfAttention) for a in attn)   # the default
    _randomise_adapters(model)                       # adapters act inside q/k/v
    batch = batch_of(model, m, shards, 1, n=8, eta=0.5)
    assert (batch["attention_mask"] == 0).any()      # padded text positions are masked
    model.eval()
    sessions = torch.tensor([0, 1, 2, 1, 0, 1, 2, 1])
    sdpa = model.predict_with(batch, sessions)
    pooled_sdpa = model.backbone(batch)
    assert install_attention(model, "eager") == len(attn)
    assert type(attn[0]).__name__ == "ViltEagerSelfAttention"   # transformers' forward + prefix
    pooled_eager = model.backbone(batch)
    assert torch.allclose(pooled_sdpa, pooled_eager, atol=1e-5, rtol=1e-4)
    assert torch.equal(sdpa, model.predict_with(batch, sessions))
    # attention probabilities requested: the SDPA class falls back to the eager forward
    install_attention(model, "sdpa")
    out = model.backbone.vilt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], output_attentions=True)
    assert len(out.attentions) == len(attn) and out.attentions[0].shape[-1] == out.attentions[0].shape[-2]


def test_eager_recipe_key_builds_eager_attention(recipe_for):
    _, _, model = build(recipe_for, **{"backbone.vilt.attention": "eager"})
    attn = [mod for mod in model.modules() if "SelfAttention" in type(mod).__name__]
    assert attn and not any(isinstance(a, ViltSdpaSelfAttention) for a in attn)


@pytest.mark.parametrize("factor_rank", [1, 3])
@pytest.mark.parametrize("modality_pools", [True, False])
def test_gathered_pools_equal_pool_by_pool_with_gradients(factor_rank, modality_pools):
    from types import SimpleNamespace
    cfg = SimpleNamespace(alpha=2.0, modality_pools=modality_pools, experts=6, rank=3,
                          factor_rank=factor_rank, a_init_std=None)
    torch.manual_seed(0)
    s = DeloSession(20, 12, cfg).double()
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    x = torch.randn(4, 7, 20, dtype=torch.float64)
    q_v, q_t, q_all = (torch.randn(4, 20, dtype=torch.float64) for _ in range(3))
    fused = s.delta(x, q_v, q_t, q_all)
    if modality_pools:
        plain = s.alpha * (s.visual.delta(x, q_v) + s.textual.delta(x, q_t))
    else:
        plain = s.alpha * s.unified.delta(x, q_all)
    params = list(s.parameters())
    g_fused = torch.autograd.grad(fused.square().sum(), params, allow_unused=True)
    g_plain = torch.autograd.grad(plain.square().sum(), params, allow_unused=True)
    assert fused.abs().max() > 0 and torch.allclose(fused, plain, atol=1e-10)
    for a, b in zip(g_fused, g_plain):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-9))


def _forward(model, batch, k, proxy=None, record=False):
    """Session k's logits with the context set by hand (proxy: a simulated missing modality)."""
    model.set_batch(batch, record=record, proxy=proxy)
    model.ctx.uniform_session, model.ctx.session = k, None
    return model.heads[k](model.run_backbone(batch))


def _sequential_objective(model, batch, k, m, epoch):
    """The objective as it was: L_con's proxy pass as a second forward after the main one."""
    logits = _forward(model, batch, k, record=True)
    ce = supervised_loss(logits, batch, model.local_index[k], False)
    complete = ~(batch["missing_text"] | batch["missing_image"])
    scale = 1.0 / max(complete.sum().item(), 1)
    align = alignment_sum(model.ctx.queries, complete) * scale
    idx = complete.nonzero().squeeze(1)
    sub = subset(batch, idx)
    con = consistency_sum(logits[idx], _forward(model, sub, k, proxy=proxy_choice(sub["keys"], epoch)),
                          False) * scale
    return ce + m.lambda_align * align + m.lambda_con * con, {"ce": ce.item(), "align": align.item(),
                                                              "con": con.item()}


def test_batched_consistency_pass_equals_a_second_forward(recipe_for, shards):
    recipe, m, model = build(recipe_for)
    params = model.set_trainable(1)
    _randomise_adapters(model)
    model.train()
    batch = batch_of(model, m, shards, 1, n=8, eta=0.5)
    complete = ~(batch["missing_text"] | batch["missing_image"])
    assert 0 < complete.sum() < 8
    loss, parts = objective(model, model, batch, 1, epoch=3)
    grads = torch.autograd.grad(loss, list(params.values()))
    ref_loss, ref_parts = _sequential_objective(model, batch, 1, recipe.method.settings, epoch=3)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    assert parts["con"] > 0 and parts["align"] > 0
    for name in ("ce", "align", "con"):
        assert parts[name] == pytest.approx(ref_parts[name], rel=1e-4, abs=1e-6), name
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_identification_features_reuse_the_forward_and_equal_a_separate_pass(recipe_for, shards):
    # first_layer: a source that reads no pooled feature, so the forward's hook serves it
    recipe, m, model = build(recipe_for, **{"task_id.source": "first_layer"})
    model.train()
    batch = batch_of(model, m, shards, 0, n=8, eta=0.5)
    objective(model, model, batch, 0, epoch=0)     # the batched forward
    assert model._first_layer is not None and model._first_layer[0] is batch["input_ids"]
    cached = model.identification_features(batch)
    q_v, q_t = model.backbone.first_layer_queries(batch)           # the separate key pass
    assert len(cached["q_v"]) == 8
    assert torch.allclose(cached["q_v"], q_v, atol=1e-5) and torch.allclose(cached["q_t"], q_t, atol=1e-5)
    model._first_layer = None
    fresh = model.identification_features(batch)                   # the protocol's own pass
    assert torch.allclose(cached["q_all"], fresh["q_all"], atol=1e-5)
    other = batch_of(model, m, shards, 1, n=8)                     # another batch: recomputed
    q_v, q_t = model.backbone.first_layer_queries(other)
    # (two runs of the same pass differ by ~2e-7 here: oneDNN's kernels vary with alignment)
    assert torch.allclose(model.identification_features(other)["q_v"], q_v, atol=1e-5)


def test_routing_inside_the_forward_equals_a_key_pass_with_ten_sessions(recipe_for, shards):
    """10 sessions (the data's 3, each on 3 or 4 distinct batches), keys from each session's training batches: the
    in-forward routing picks the same sessions and predictions as a key pass + predict_with."""
    recipe, m, _ = build(recipe_for, **{"task_id.source": "first_layer"})
    classes = [s["classes"] for s in m["sessions"]]
    torch.manual_seed(0)
    model = ContinualModel(recipe, [classes[k % 3] for k in range(10)], m["num_classes"])
    _randomise_adapters(model)
    model.eval()
    for k in range(10):  # session k: the (k // 3)-th batch of data session k % 3
        stream = SessionStream(shards, m, k % 3, "train", 16, model.backbone.collate, {}, train=False)
        observe_task_id(model, list(stream)[k // 3], k)
    batch = batch_of(model, m, shards, 2, "test", n=12, eta=0.6)
    out = model.predict(batch, seen=10)
    q_v, q_t = model.backbone.first_layer_queries(batch)
    present = torch.stack([~batch["missing_image"], ~batch["missing_text"]], 1)
    keys = model.identifier.select(torch.stack([q_v, q_t], 1), present, 10)
    assert torch.equal(out["routed"], keys)
    assert torch.equal(out["pred"], model.predict_with(batch, keys))
    ref = copy.deepcopy(model)
    ref._hooked = False                                             # the plain path
    plain = ref.predict(batch, seen=10)
    for key in ("routed", "pred", "oracle_pred"):
        assert torch.equal(out[key], plain[key]), key


# ---------------------------------------------------------------- mixed precision

def _train_recording_losses(recipe):
    from delo_dist.training.trainer import Trainer
    trainer, losses = Trainer(recipe), []
    step = trainer.train_step

    def recording(*args, **kwargs):
        parts = step(*args, **kwargs)
        losses.append(parts["loss"])
        return parts
    trainer.train_step = recording
    assert trainer.run() == 0
    return trainer, losses


def test_bf16_autocast_trains_like_fp32_with_fp32_trainable_tensors(recipe_for, tmp_path):
    """The quickstart (tiny) on the torch engine: the bf16 loss curve follows fp32's."""
    common = {"data.sessions": 1, "train.epochs": 2}
    _, fp32 = _train_recording_losses(recipe_for(**common, **{
        "train.mixed_precision": "no", "output_dir": str(tmp_path / "fp32")}))
    trainer, bf16 = _train_recording_losses(recipe_for(**common, **{
        "train.mixed_precision": "bf16", "output_dir": str(tmp_path / "bf16")}))
    assert trainer.precision == "bf16" and len(bf16) == len(fp32) == 16
    assert all(p.dtype == torch.float32 for p in trainer.model.session_parameters(0).values())
    fp32, bf16 = torch.tensor(fp32), torch.tensor(bf16)
    # the same curve up to bf16 noise (measured: 2e-3 at most, with steps moving it by 0.1-0.3)
    assert (bf16 - fp32).abs().max() < 0.02
    assert bf16.ne(fp32).any()                                      # autocast did act
    metrics = __import__("json").loads(open(trainer.out / "metrics.json").read())
    assert metrics["mixed_precision"] == "bf16"


def test_mixed_precision_resolution(monkeypatch):
    from delo_dist.training.engines import resolve_precision
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto", torch.device("cpu"), "deepspeed") == "bf16"
    assert resolve_precision("no", torch.device("cpu"), "torch") == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision("auto", torch.device("cpu"), "torch") == "no"
    with pytest.raises(ValueError, match="train.mixed_precision: fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"), "torch")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION='fp8'.*expected no, bf16 or fp16"):
        resolve_precision("auto", torch.device("cpu"), "torch")


@pytest.mark.slow
def test_deepspeed_two_ranks_train_under_bf16_autocast(shards, tmp_path):
    """2 processes, ZeRO-2 over gloo, bf16 asked by the recipe: autocast with fp32 trainable
    tensors (checkpointed as fp32), a loss within bf16 noise of one fp32 process."""
    import json
    from safetensors.torch import load_file
    from tests.conftest import tiny_overrides
    from tests.test_distributed import launch
    common = {"data.sessions": 1, "train.epochs": 1}
    launch(1, tiny_overrides(shards, tmp_path / "fp32", **common, **{"train.batch_size": 16,
                                                                      "train.mixed_precision": "no"}))
    launch(2, tiny_overrides(shards, tmp_path / "bf16", **common, **{"train.batch_size": 8,
                                                                      "train.mixed_precision": "bf16"}))
    fp32, bf16 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("fp32", "bf16"))
    assert bf16["mixed_precision"] == "bf16" and bf16["sessions"][0]["engine"] == "deepspeed"
    assert fp32["mixed_precision"] == "no" and bf16["world_size"] == 2
    assert bf16["sessions"][0]["train_loss"] == pytest.approx(fp32["sessions"][0]["train_loss"], abs=0.02)
    saved = load_file(str(tmp_path / "bf16" / "checkpoints" / "session_00" / "model.safetensors"))
    adapters = [t for n, t in saved.items() if ".sessions.0." in n]
    assert adapters and all(t.dtype == torch.float32 for t in adapters)
