"""Prompts in the backbone protocol (delo_dist/models/prompts.py), on tiny random ViLT (SDPA
and eager attention) and CLIP (SDPA and eager): off is bit-identical to transformers' own
modules; input prompts are inserted after the first token and removed before pooling;
prefixes reach the attention; masks keep padding and causality; gradients reach the prompts;
adapters act beside them; frozen_query is adapter- and prompt-free and reuses a frozen pass.

ViLT draws its patch order from the global RNG at every forward (transformers' visual_embed
samples with torch.multinomial), so every comparison seeds it before the forward."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.vilt.modeling_vilt import ViltSelfAttention

from delo_dist.config import BackboneConfig, load_recipe
from delo_dist.models.adapters import RoutingContext
from delo_dist.models.clip import ClipBackbone
from delo_dist.models.continual import ContinualModel
from delo_dist.models.prompts import Prompts, extend_mask, use_prompts
from delo_dist.models.vilt import ViltBackbone, ViltSettings
from delo_dist.models.vilt_sdpa import install_attention
from tests.conftest import REPO

TINY_VILT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, patch_size=16, initializer_range=0.125)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, patch_size=16, text_hidden_size=24)
TEXTS = ["salty crispy", "sweet"]   # different lengths: the shorter one is padded
KINDS = [("vilt", "sdpa"), ("vilt", "eager"), ("clip", "sdpa"), ("clip", "eager")]


def backbone(kind: str, attention: str = "sdpa", max_text_len: int = 12):
    torch.manual_seed(0)
    if kind == "vilt":
        cfg = BackboneConfig(image_size=32, max_text_len=max_text_len, tiny=dict(TINY_VILT),
                             settings=ViltSettings(attention=attention))
        return ViltBackbone(cfg, RoutingContext())
    cfg = BackboneConfig(name="clip", image_size=32, max_text_len=max_text_len, tiny=dict(TINY_CLIP))
    bb = ClipBackbone(cfg, RoutingContext())
    bb.clip.set_attn_implementation(attention)
    return bb


def batch_for(bb, texts=TEXTS, pad_to: int = 12, seed: int = 1) -> dict:
    tok = bb.tokenizer(texts, padding="max_length", max_length=pad_to, truncation=True,
                       return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    n = len(texts)
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
            "missing_text": torch.zeros(n, dtype=torch.bool),
            "missing_image": torch.zeros(n, dtype=torch.bool)}


def run(bb, batch, prompts=None) -> tuple[torch.Tensor, dict]:
    """(pooled, {encoder: transformers' output}) of one seeded forward with these prompts."""
    models = ({"joint": bb.vilt} if hasattr(bb, "vilt")
              else {"image": bb.clip.vision_model, "text": bb.clip.text_model})
    seen, handles = {}, []
    for name, m in models.items():
        handles.append(m.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out)))
    try:
        with use_prompts(bb.ctx, prompts):
            torch.manual_seed(0)
            pooled = bb(batch)
    finally:
        for h in handles:
            h.remove()
    return pooled, seen


def rand(*shape, seed=0, scale=1.0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.requires_grad_(grad)


class PlainSdpa(ViltSelfAttention):
    """The SDPA forward as it was before prefixes existed: the reference for 'off'."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        mask = None if attention_mask is None else attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return (out.transpose(1, 2).reshape(b, n, self.all_head_size),)


def stock(kind: str, attention: str):
    """The same weights with no prompt hook and transformers' own attention classes."""
    bb = backbone(kind, attention)
    for hooks in bb.prompt_hooks:
        hooks.detach()
    for m in bb.modules():
        if isinstance(m, ViltSelfAttention):
            m.__class__ = PlainSdpa if attention == "sdpa" else ViltSelfAttention
        elif isinstance(m, CLIPAttention):
            m.__class__ = CLIPAttention
    return bb


def every_site(bb, length: int, batch: int = 2, seed: int = 0) -> Prompts:
    sites = bb.prompt_sites()
    return Prompts(input={(s.encoder, s.layer): rand(batch, length, s.width, seed=seed + i)
                          for i, s in enumerate(sites)},
                   prefix={(s.encoder, s.layer): (rand(batch, length, s.width, seed=seed + 50 + i),
                                                  rand(batch, length, s.width, seed=seed + 90 + i))
                           for i, s in enumerate(sites)})


@pytest.mark.parametrize("kind,attention", KINDS)
def test_off_is_bit_identical_to_the_frozen_backbone(kind, attention):
    """No prompts, zero-length prompts at every site, or ctx.enabled False: pooled output and
    last hidden states equal (torch.equal) those of transformers' own modules, no hook."""
    bb, ref = backbone(kind, attention), stock(kind, attention)
    batch = batch_for(bb)
    assert (batch["attention_mask"] == 0).any()            # padding: masks are in play
    want_pooled, want = run(ref, batch)
    checks = {"none": (None, True), "zero-length": (every_site(bb, 0), True),
              "disabled": (every_site(bb, 3), False)}
    for name, (prompts, enabled) in checks.items():
        bb.ctx.enabled = enabled
        pooled, got = run(bb, batch, prompts)
        bb.ctx.enabled = True
        assert torch.equal(pooled, want_pooled), name
        for enc in want:
            assert torch.equal(got[enc].last_hidden_state, want[enc].last_hidden_state), (name, enc)
    # and with prompts on, the very same modules do change the output
    assert not torch.allclose(run(bb, batch, every_site(bb, 3))[0], want_pooled, atol=1e-3)


@pytest.mark.parametrize("kind,attention", [("vilt", "sdpa"), ("vilt", "eager"), ("clip", "sdpa")])
def test_prompts_change_outputs_and_gradients_reach_them(kind, attention):
    bb = backbone(kind, attention)
    batch = batch_for(bb)
    base, _ = run(bb, batch)
    for site in bb.prompt_sites():
        d, key = site.width, (site.encoder, site.layer)
        p = rand(2, 3, d, grad=True)
        kv = (rand(2, 4, d, seed=1, grad=True), rand(2, 4, d, seed=2, grad=True))
        for prompts, tensors in ((Prompts(input={key: p}), [p]), (Prompts(prefix={key: kv}), list(kv))):
            out, _ = run(bb, batch, prompts)
            assert (out - base).abs().max() > 1e-3, (site, prompts)
            grads = torch.autograd.grad(out.square().sum(), tensors)
            assert all(g.abs().sum() > 0 for g in grads), site
    if kind == "clip":  # an image prompt changes the image half only; a text prompt, the text half
        h = bb.clip.config.projection_dim
        image, _ = run(bb, batch, Prompts(input={("image", 0): rand(2, 3, 32)}))
        text, _ = run(bb, batch, Prompts(prefix={("text", 1): (rand(4, 24), rand(4, 24, seed=1))}))
        assert torch.equal(image[:, h:], base[:, h:]) and not torch.allclose(image[:, :h], base[:, :h])
        assert torch.equal(text[:, :h], base[:, :h]) and not torch.allclose(text[:, h:], base[:, h:])


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_sdpa_and_eager_agree_with_prompts(kind):
    """The mask the hooks rebuild is boolean (CLIP SDPA) or additive (ViLT, CLIP eager):
    both forms give the same outputs, prompts and prefixes everywhere."""
    bb = backbone(kind, "sdpa")
    batch = batch_for(bb)
    prompts = every_site(bb, 3)
    sdpa, _ = run(bb, batch, prompts)
    if kind == "vilt":
        install_attention(bb.vilt, "eager")
    else:
        bb.clip.set_attn_implementation("eager")
    eager, _ = run(bb, batch, prompts)
    assert torch.allclose(sdpa, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_input_prompts_are_removed_before_pooling(kind):
    bb = backbone(kind)
    batch = batch_for(bb)
    _, plain = run(bb, batch)
    enc = "joint" if kind == "vilt" else "text"
    d = bb.prompt_sites()[0].width if kind == "vilt" else 24
    layers = {(enc, 0): rand(2, 3, d), (enc, 1): rand(2, 2, d, seed=1)}
    for replace, kept in ((False, 5), (True, 2)):   # MAP accumulates; VPT-deep / RebQ replace
        prompts = Prompts(input=layers, replace_input=replace)
        _, out = run(bb, batch, prompts)
        assert out[enc].last_hidden_state.shape == plain[enc].last_hidden_state.shape
        assert prompts.outputs[enc].shape == (2, kept, d)
    if kind == "clip":  # EOS pooling reads the same position of the prompt-free sequence
        eos = (batch["input_ids"] == bb.clip.config.text_config.eos_token_id).int().argmax(1)
        rows = torch.arange(2)
        h, h_plain = out["text"].last_hidden_state, plain["text"].last_hidden_state
        assert torch.equal(out["text"].pooler_output, h[rows, eos])
        assert not torch.allclose(h[rows, eos], h_plain[rows, eos])   # and the prompts acted


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_padding_changes_nothing_with_prompts_on(kind):
    """The same texts padded to 12 or 16 tokens, and garbage in the padded positions: the
    pooled feature does not move (padded keys stay masked in the rebuilt masks)."""
    bb = backbone(kind, max_text_len=16)
    prompts = every_site(bb, 3)
    short, long = batch_for(bb, pad_to=12), batch_for(bb, pad_to=16)
    a, _ = run(bb, short, prompts)
    b, _ = run(bb, long, prompts)
    assert torch.allclose(a, b, atol=1e-5)
    noisy = dict(long, input_ids=long["input_ids"].clone())
    pads = long["attention_mask"] == 0
    noisy["input_ids"][pads] = 7                           # another token under the mask
    c, _ = run(bb, noisy, prompts)
    assert torch.allclose(b, c, atol=1e-6)


def test_vilt_attention_sees_prompts_and_prefix_never_padding():
    """Eager attention probabilities, prompts in: every query attends to the prefix rows and
    to the input prompts; padded text keys get exactly zero."""
    bb = backbone("vilt", "eager")
    batch = batch_for(bb)
    d = bb.hidden_size
    prompts = Prompts(input={("joint", 0): rand(2, 3, d)},
                      prefix={("joint", 1): (rand(2, 4, d), rand(2, 4, d))})
    with use_prompts(bb.ctx, prompts):
        torch.manual_seed(0)
        out = bb.vilt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], output_attentions=True)
    a0, a1 = out.attentions                                # (B, heads, N + 3, [4 +] N + 3)
    n = batch["input_ids"].shape[1] + 3 + (32 // 16) ** 2 + 1
    assert a0.shape[-2:] == (n, n) and a1.shape[-2:] == (n, 4 + n)
    assert (a1[..., :4] > 0).all()                         # prefix: seen by every query
    assert (a0[..., 1:4] > 0).all() and (a1[..., 5:8] > 0).all()   # input prompts, after [CLS]
    pad = (batch["attention_mask"] == 0).nonzero()         # (row, text position)
    for row, pos in pad.tolist():
        col = pos + 3 if pos else pos                      # text after [CLS] moved by 3 prompts
        assert (a0[row, ..., col] == 0).all() and (a1[row, ..., 4 + col] == 0).all()


def test_clip_text_stays_causal_with_prompts():
    """What holds in the causal text encoder with input prompts and a prefix: a text token's
    output depends only on the text before it (and the prompts): changing token j leaves the
    outputs before j unchanged; [BOS] precedes the input prompts, so its output is the
    prompt-free one unless a prefix (seen by every query, [BOS] included) is given."""
    bb = backbone("clip")
    batch = batch_for(bb)
    inputs = {("text", 0): rand(2, 3, 24), ("text", 1): rand(2, 2, 24, seed=1)}
    prefix = {("text", 1): (rand(2, 4, 24, seed=2), rand(2, 4, 24, seed=3))}
    j = 3                                                  # a real token of row 0
    assert batch["attention_mask"][0, j] == 1
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, j] = 11
    _, plain = run(bb, batch)
    for prompts in (Prompts(input=inputs), Prompts(input=inputs, prefix=prefix)):
        _, a = run(bb, batch, prompts)
        _, b = run(bb, changed, prompts)
        ha, hb = a["text"].last_hidden_state, b["text"].last_hidden_state
        assert torch.allclose(ha[0, :j], hb[0, :j], atol=1e-6)
        assert not torch.allclose(ha[0, j:], hb[0, j:], atol=1e-3)
        bos_same = torch.allclose(ha[:, 0], plain["text"].last_hidden_state[:, 0], atol=1e-6)
        assert bos_same == (not prompts.prefix)


def test_extend_mask_patterns():
    """The rebuilt masks, cell by cell: causal boolean (CLIP text under SDPA) and additive
    padding (ViLT, CLIP eager), 2 prompts after the first token and 1 prefix key."""
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None].clone()
    causal[0, 0, :, 2] = False                             # token 2 is padding
    m = extend_mask(causal, n=2, n_pre=1, causal=True, length=3, device="cpu")[0, 0].int()
    want = torch.tensor([[1, 1, 0, 0, 0, 0],               # [BOS]: prefix, itself
                         [1, 1, 1, 0, 0, 0],               # prompt 1: + itself
                         [1, 1, 1, 1, 0, 0],               # prompt 2: + prompt 1, itself
                         [1, 1, 1, 1, 1, 0],               # text: all before it
                         [1, 1, 1, 1, 1, 0]])              # padding row; padded key masked
    assert torch.equal(m, want)
    no_padding = extend_mask(None, 2, 1, True, 3, "cpu")[0, 0].int()   # SDPA's is_causal case
    assert torch.equal(no_padding[:, 1:], torch.ones(5, 5, dtype=torch.int).tril())
    assert no_padding[:, 0].all()
    low = torch.finfo(torch.float32).min
    pad = torch.zeros(2, 1, 3, 3)
    pad[1, ..., 2] = low                                   # row 1: key 2 padded
    m = extend_mask(pad, n=2, n_pre=1, causal=False, length=3, device="cpu")
    assert m.shape == (2, 1, 5, 6)
    assert (m[0] == 0).all() and (m[1, ..., :5] == 0).all() and (m[1, ..., 5] == low).all()
    assert extend_mask(None, 2, 1, False, 3, "cpu") is None   # nothing to mask at all


def test_per_sample_prompts_follow_their_rows():
    """One sample twice in a batch: different prompt rows give different outputs, equal rows
    equal outputs, and row b's output is the one its prompt gives when shared by all."""
    bb = backbone("vilt")
    batch = batch_for(bb, texts=["salty crispy"] * 2)
    batch["pixel_values"][1] = batch["pixel_values"][0]
    d = bb.hidden_size
    rows = rand(2, 3, d)
    kv = (rand(2, 2, d, seed=1), rand(2, 2, d, seed=2))
    out, _ = run(bb, batch, Prompts(input={("joint", 0): rows}, prefix={("joint", 1): kv}))
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    same, _ = run(bb, batch, Prompts(input={("joint", 0): rows[:1]},           # (1, P, d): shared
                                     prefix={("joint", 1): (kv[0][0], kv[1][0])}))  # (P, d)
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[0], out[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_delo_adapters_act_beside_prompts(kind):
    """DeLo's routers average real tokens only: the prompt positions are masked out of the
    modality queries, so layer 0's queries equal the prompt-free ones; and the adapters still
    change the output with prompts on."""
    clip = ["backbone.name=clip", "backbone.tiny.text_hidden_size=24"] if kind == "clip" else []
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "backbone.image_size=32", "backbone.max_text_len=12", "backbone.tiny.hidden_size=32",
        "backbone.tiny.intermediate_size=64", "backbone.tiny.num_attention_heads=2",
        "method.delo.experts=4", "method.delo.rank=2", "task_id.source=first_layer", *clip])
    torch.manual_seed(0)
    model = ContinualModel(recipe, [[0, 1], [2, 3]], 4).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in model.adapted:
            for p in a.sessions.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = batch_for(model.backbone)
    sites = model.backbone.prompt_sites()
    prompts = Prompts(input={(s.encoder, s.layer): rand(2, 3, s.width) for s in sites if s.layer == 0},
                      prefix={(s.encoder, s.layer): (rand(2, 2, s.width), rand(2, 2, s.width, seed=1))
                              for s in sites if s.layer == 1})

    def forward(p):
        with use_prompts(model.ctx, p):
            torch.manual_seed(0)
            logits = model.session_forward(batch, 0, record=True)
        return logits, model.ctx.queries[0]

    plain, q_plain = forward(None)
    tokens = model.ctx.text_tokens
    prompted, q_prompted = forward(prompts)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(q_plain, q_prompted))
    assert not torch.allclose(plain, prompted, atol=1e-4)
    assert torch.equal(model.ctx.text_tokens, tokens)     # the token masks restored after
    with torch.no_grad():
        for a in model.adapted:
            a.session_module(0).visual.B.zero_()
            a.session_module(0).textual.B.zero_()
    no_update, _ = forward(prompts)                        # adapters with a zero update
    assert not torch.allclose(no_update, prompted, atol=1e-4)


@pytest.mark.parametrize("kind", ["vilt", "clip"])
def test_frozen_query_is_adapter_and_prompt_free_and_reuses_a_frozen_pass(kind):
    bb = backbone(kind)
    batch = batch_for(bb)
    calls = []
    bb.register_forward_pre_hook(lambda *a: calls.append(1))
    bb.ctx.prompts = every_site(bb, 3)                     # on, but frozen_query ignores them
    torch.manual_seed(0)
    q = bb.frozen_query(batch)
    bb.ctx.prompts = None
    assert len(calls) == 1 and bb.ctx.enabled              # one frozen pass, state restored
    bb.ctx.enabled = False
    pooled, out = run(bb, batch)                           # the frozen forward itself
    bb.ctx.enabled = True
    assert torch.equal(q["pooled"], pooled)
    if kind == "vilt":
        h = out["joint"].last_hidden_state                 # after the last layer norm
        assert set(q) == {"cls", "text_cls", "image_cls", "pooled"}
        assert torch.equal(q["cls"], h[:, 0]) and torch.equal(q["text_cls"], h[:, 0])
        assert torch.equal(q["image_cls"], h[:, batch["input_ids"].shape[1]])
    else:
        assert set(q) == {"image", "text", "cls", "pooled"}
        assert torch.equal(q["image"], out["image"].pooler_output) and q["image"].shape == (2, 32)
        assert torch.equal(q["text"], out["text"].pooler_output) and q["text"].shape == (2, 24)
        assert torch.equal(q["cls"], pooled)
    calls.clear()
    again = bb.frozen_query(batch)                         # the frozen forward just ran: reused
    assert not calls and torch.equal(again["pooled"], pooled)
    bb.frozen_query(batch_for(bb, seed=2))                 # another batch: one more pass
    assert len(calls) == 1


def test_bad_prompt_shapes_name_the_site():
    bb = backbone("vilt")
    batch = batch_for(bb)
    with pytest.raises(ValueError, match=r"prompts.input\[\('joint', 1\)\].*\(B=2 or 1, P, 32\)"):
        run(bb, batch, Prompts(input={("joint", 1): torch.zeros(2, 3, 16)}))
    with pytest.raises(ValueError, match=r"prompts.prefix\[\('joint', 0\)\]: keys and values differ"):
        run(bb, batch, Prompts(prefix={("joint", 0): (torch.zeros(2, 3, 32), torch.zeros(2, 2, 32))}))
    for site in (("joint", 2), ("text", 0)):               # 2 layers; ViLT has one encoder
        with pytest.raises(ValueError, match=r"no such site; encoders \['joint'\], layers 0..1"):
            run(bb, batch, Prompts(input={site: torch.zeros(2, 3, 32)}))
    assert run(bb, batch)[0].shape == (2, 32)              # the next forward is clean


def test_a_deep_copy_prompts_its_own_context():
    """bench deep-copies models: the copy's hooks must read the copy's context."""
    bb = backbone("vilt")
    twin = copy.deepcopy(bb)
    batch = batch_for(bb)
    prompts = every_site(bb, 2)
    assert torch.equal(run(bb, batch, prompts)[0], run(twin, batch, prompts)[0])
    bb.ctx.prompts = prompts                               # the original's context only
    assert torch.equal(run(twin, batch)[0], run(stock("vilt", "sdpa"), batch)[0])
    bb.ctx.prompts = None
