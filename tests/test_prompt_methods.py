"""The prompt methods' model side (delo_dist/methods/): shapes on ViLT-like and CLIP-like widths,
their losses moving what they should, continual hygiene, MAP's case prompts, RebQ's
reconstruction and DualPrompt's routing. No backbone runs here: sites and frozen queries are
given as `prompt_sites()` and `frozen_query()` give them, and RebQ's memory pass is a small
differentiable stand-in (a fixed linear read of the memory prompts)."""
from __future__ import annotations

import pytest
import torch

from delo_dist.methods.coda_prompt import CodaPrompt, CodaPromptSettings
from delo_dist.methods.dualprompt import DualPrompt, DualPromptSettings
from delo_dist.methods.l2p import L2P, L2PSettings
from delo_dist.methods.map import Map, MapSettings
from delo_dist.methods.msp import Msp, MspSettings
from delo_dist.methods.prompt_pools import orthogonal_rows, select_sites
from delo_dist.methods.rebq import DROP_IMAGE, DROP_TEXT, RebQ, RebQSettings, augmentation, augmented_flags

# the paper-size backbones' prompt sites and frozen-query widths (12 layers each)
VILT = ([("joint", l, 768) for l in range(12)], {"cls": 768, "text_cls": 768, "image_cls": 768})
CLIP = ([("text", l, 512) for l in range(12)] + [("image", l, 768) for l in range(12)],
        {"image": 768, "text": 512, "cls": 1280})
# small ones for the training tests (widths still differ between CLIP's encoders)
SMALL_VILT = ([("joint", l, 24) for l in range(8)], {"cls": 24, "text_cls": 24, "image_cls": 24})
SMALL_CLIP = ([("text", l, 16) for l in range(8)] + [("image", l, 24) for l in range(8)],
              {"image": 24, "text": 16, "cls": 40})

METHODS = {"map": (Map, MapSettings), "msp": (Msp, MspSettings), "l2p": (L2P, L2PSettings),
           "dualprompt": (DualPrompt, DualPromptSettings), "coda_prompt": (CodaPrompt, CodaPromptSettings),
           "rebq": (RebQ, RebQSettings)}
SMALL = {"map": {"layers": [0, 1]}, "msp": {"layers": [0, 1]}, "l2p": {},
         "dualprompt": {"g_layers": [0], "e_layers": [1, 2]},
         "coda_prompt": {"pool_size": 8, "layers": [0, 1]},
         "rebq": {"pool_size": 6, "layers": [0, 1], "memory_layers": [0, 1]}}


def build(name, backbone, sessions=10, started=1, **settings):
    cls, settings_cls = METHODS[name]
    sites, dims = backbone
    torch.manual_seed(0)
    method = cls(settings_cls(**settings), sites, dims, sessions)
    for k in range(started):
        method.start_session(k)
    return method


def batch(dims, b=6, seed=1):
    """A session-like batch: queries spread around one direction per entry; rows complete, text
    missing, image missing, ..."""
    g = torch.Generator().manual_seed(seed)
    query = {name: torch.randn(w, generator=g) + 0.3 * torch.randn(b, w, generator=g)
             for name, w in dims.items()}
    missing_text = torch.tensor([False, True, False] * (b // 3))
    missing_image = torch.tensor([False, False, True] * (b // 3))
    return query, missing_text, missing_image


def memory_pass(prompts, query, readers):
    """Stand-in for the backbone's prompted query pass: each query entry moves by a fixed
    linear read of the memory prompts of the encoder that produces it."""
    out = {k: v.clone() for k, v in query.items()}
    for (encoder, layer), rows in prompts.input.items():
        for name in readers[encoder]:
            out[name] = out[name] + rows.mean(1) @ readers[(encoder, layer, name)]
    return out


def make_readers(method: RebQ, backbone):
    sites, dims = backbone
    g = torch.Generator().manual_seed(7)
    by_encoder = {"joint": [method.text_q, method.image_q], "text": [method.text_q],
                  "image": [method.image_q]}
    readers = {e: by_encoder[e] for e, _, _ in sites}
    for e, l, w in method.memory_sites:
        for name in by_encoder[e]:
            readers[(e, l, name)] = torch.randn(w, dims[name], generator=g) / w ** 0.5
    return readers


def rebq_step_inputs(method, backbone, session):
    """Rows [batch; its augmented copies], the memory pass over them, for one RebQ forward. A
    missing modality's frozen query is its dummy's: one fixed vector."""
    query, mt, mi = batch(backbone[1])
    source, dropped = augmentation(mt, mi)
    mt_all, mi_all = augmented_flags(mt, mi, source, dropped)
    rows = {k: torch.cat([v, v[source]]) for k, v in query.items()}
    for name, missing in ((method.text_q, mt_all), (method.image_q, mi_all)):
        rows[name] = torch.where(missing[:, None], torch.full_like(rows[name], 0.5), rows[name])
    readers = make_readers(method, backbone)
    memory = memory_pass(method.memory_prompts(rows, mt_all, mi_all, session).prompts, rows, readers)
    return rows, mt_all, mi_all, memory, (source, dropped)


def prompt_tensors(prompts):
    out = list((prompts.input or {}).values())
    for k, v in (prompts.prefix or {}).values():
        out += [k, v]
    return out


def toy_loss(out, weights: dict):
    """A fixed random linear read of every prompt tensor, plus the method's weighted terms."""
    total = sum((weights.setdefault(i, torch.randn(t.shape[1:], generator=torch.Generator().manual_seed(i)))
                 * t).sum() for i, t in enumerate(prompt_tensors(out.prompts)))
    return total + sum(w * v for w, v in out.losses.values())


def forward(method, backbone, session):
    if isinstance(method, RebQ):
        rows, mt, mi, memory, aug = rebq_step_inputs(method, backbone, session)
        return method(rows, mt, mi, session, memory=memory, augmented=aug)
    query, mt, mi = batch(backbone[1])
    return method(query, mt, mi, session)


# ---- shapes -----------------------------------------------------------------------------------

EXPECTED = {   # paper defaults: (kind, layers, rows per sample at each site) per encoder
    "map": ("input", range(6), 16), "msp": ("input", range(6), 32), "l2p": ("input", [0], 25),
    "coda_prompt": ("prefix", range(5), 4),
}


@pytest.mark.parametrize("backbone", [VILT, CLIP], ids=["vilt", "clip"])
@pytest.mark.parametrize("name", list(METHODS))
def test_prompts_have_the_papers_shapes_at_the_papers_layers(name, backbone):
    method = build(name, backbone, started=2)
    sites, dims = backbone
    widths = {(e, l): w for e, l, w in sites}
    for session in (1, None):
        out = forward(method, backbone, session)
        p = out.prompts
        if name in EXPECTED:
            kind, layers, rows = EXPECTED[name]
            got = p.input if kind == "input" else p.prefix
            assert set(got) == {(e, l) for e, l, _ in sites if l in layers}
            assert not (p.prefix if kind == "input" else p.input)
            for site, t in got.items():
                for x in (t if kind == "prefix" else (t,)):
                    assert x.shape == (6, rows, widths[site])
        elif name == "dualprompt":   # G 5 + 5 rows at 0-1, E 5 + 5 rows at 2-4
            assert set(p.prefix) == {(e, l) for e, l, _ in sites if l in range(5)} and not p.input
            for site, (k, v) in p.prefix.items():
                assert k.shape == v.shape == (6, 5, widths[site])
        else:   # rebq: text + image pools at 0-7 (4 key rows each); memory: its own pass
            assert set(p.prefix) == {(e, l) for e, l, _ in sites if l in range(8)} and not p.input
            for site, (k, v) in p.prefix.items():
                assert k.shape == v.shape == (6, 8 if site[0] == "joint" else 4, widths[site])
            mem = method.memory_prompts(*batch(dims), session).prompts
            assert {s: t.shape for s, t in mem.input.items()} == \
                {(e, l): (6, 8, w) for e, l, w in sites if l in range(8)}


def test_layers_a_backbone_lacks_are_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"key 'layers': layers \[2, 3, 4, 5\] .* encoder 'joint'"):
        select_sites(SMALL_VILT[0][:2], [0, 1, 2, 3, 4, 5], "layers")


def test_default_settings_validate_and_bad_values_name_their_key():
    bad: list[str] = []
    def check(cond, key, expected, got):
        if not cond:
            bad.append(key)
    for _, settings in METHODS.values():
        settings().validate(check)
    assert bad == []
    MapSettings(position="prefix", length=7).validate(check)
    L2PSettings(top_n=11).validate(check)
    DualPromptSettings(routing="oracle").validate(check)
    RebQSettings(memory_position="prefix", memory_length=7, reconstruction_target="x").validate(check)
    assert bad == ["length", "top_n", "routing", "memory_length", "reconstruction_target"]


# ---- losses move what they should ----------------------------------------------------------

def sgd_on(params, loss_fn, steps=20, lr=0.5, adam=False):
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def test_l2p_key_loss_pulls_the_chosen_keys_to_the_query():
    method = build("l2p", SMALL_VILT)
    query, mt, mi = batch(SMALL_VILT[1])
    keys0 = method.pool.keys.detach().clone()
    first, last = sgd_on([method.pool.keys], lambda: method(query, mt, mi, 0).losses["l2p_key"][1])
    assert last < 0.5 * first
    assert not torch.equal(method.pool.keys, keys0)
    assert method(query, mt, mi, 0).losses["l2p_key"][0] == 0.1   # the paper's lambda


def test_l2p_selects_per_sample():
    method = build("l2p", SMALL_VILT, top_n=1)
    query = {"cls": method.pool.keys.detach()[[3, 7, 3, 0]]}
    f = torch.zeros(4, dtype=torch.bool)
    out = method(query, f, f)
    assert out.extras["prompt_idx"][:, 0].tolist() == [3, 7, 3, 0]
    assert torch.equal(out.prompts.input[("joint", 0)][1], method.pool.prompts["joint_0"][7])


def test_dualprompt_key_loss_pulls_the_session_key_to_its_queries():
    method = build("dualprompt", SMALL_CLIP)
    query, mt, mi = batch(SMALL_CLIP[1])
    first, last = sgd_on([method.e_keys[0]], lambda: method(query, mt, mi, 0).losses["dualprompt_key"][1])
    assert last < 0.5 * first


def test_coda_orthogonality_loss_moves_the_new_slice():
    method = build("coda_prompt", SMALL_VILT, sessions=2, started=2, **SMALL["coda_prompt"])
    pool = method.pools["joint_0"]
    with torch.no_grad():   # a slice far from orthogonal
        pool.K[1].add_(1.0)
    query, mt, mi = batch(SMALL_VILT[1])
    first, last = sgd_on(method.session_parameters(1),
                         lambda: method(query, mt, mi, 1).losses["coda_ortho"][1], lr=0.2)
    assert last < 0.5 * first


def test_msp_orthogonality_loss_separates_the_modality_prompts():
    method = build("msp", SMALL_CLIP, **SMALL["msp"])
    with torch.no_grad():   # the image prompts start as the text prompts
        for name in method.text:
            method.image[name].copy_(method.text[name] + 0.01 * torch.randn_like(method.text[name]))
    query, mt, mi = batch(SMALL_CLIP[1])
    first, last = sgd_on(method.session_parameters(0),
                         lambda: method(query, mt, mi, 0).losses["msp_ortho"][1])
    assert first > 0.05 and last < 0.2 * first


# ---- continual hygiene -----------------------------------------------------------------------

@pytest.mark.parametrize("backbone", [SMALL_VILT, SMALL_CLIP], ids=["vilt", "clip"])
@pytest.mark.parametrize("name", ["dualprompt", "coda_prompt", "rebq"])
def test_earlier_sessions_parts_get_no_gradient_and_stay_bit_identical(name, backbone):
    method = build(name, backbone, sessions=2, started=1, **SMALL[name])
    weights: dict = {}
    sgd_on(method.session_parameters(0), lambda: toy_loss(forward(method, backbone, 0), weights),
           steps=3, lr=0.01)
    method.start_session(1)
    old = {id(p) for p in method.session_parameters(0)}
    new = method.session_parameters(1)
    shared = [p for p in new if id(p) in old]
    assert (name == "dualprompt") == bool(shared)                 # only DualPrompt's G-prompt is shared
    earlier = [p for p in method.session_parameters(0) if id(p) not in {id(q) for q in shared}]
    before = [p.detach().clone() for p in earlier]
    for p in method.parameters():
        p.grad = None
    first, last = sgd_on(new, lambda: toy_loss(forward(method, backbone, 1), weights), steps=3, lr=0.01)
    assert last < first                                            # session 1 did train
    assert all(p.grad is None for p in earlier)
    assert all(torch.equal(p, b) for p, b in zip(earlier, before))
    assert {id(p) for p in method.parameters()} == old | {id(p) for p in new}


@pytest.mark.parametrize("name", ["map", "msp", "l2p"])
def test_shared_methods_train_the_same_parameters_in_every_session(name):
    method = build(name, SMALL_VILT, **SMALL[name])
    method.start_session(1)
    ids = [{id(p) for p in method.session_parameters(k)} for k in (0, 1)]
    assert ids[0] == ids[1] == {id(p) for p in method.parameters()}


@pytest.mark.parametrize("built", ["when_started", "up_front"])
@pytest.mark.parametrize("backbone", [SMALL_VILT, SMALL_CLIP], ids=["vilt", "clip"])
@pytest.mark.parametrize("name", ["coda_prompt", "rebq"])
def test_a_new_slice_starts_orthogonal_to_the_trained_earlier_ones(name, backbone, built):
    """Created when its session starts, or built up front (as the plug-in does, so that a
    checkpoint loads by name) and drawn again by start_session: either way orthonormal and
    orthogonal to the trained slice 0; the draw comes from the global RNG (a resumed run,
    whose checkpoint restores it, draws the same)."""
    method = build(name, backbone, sessions=2, started=2 if built == "up_front" else 1, **SMALL[name])
    sgd_on(method.session_parameters(0), lambda: toy_loss(forward(method, backbone, 0), {}), steps=3, lr=0.05)
    pools = list(method.pools.values()) if name == "coda_prompt" else method.all_pools()
    state = torch.get_rng_state()
    method.start_session(1)
    drawn = [p.detach().clone() for pool in pools for p in pool.session_parameters(1)]
    for pool in pools:
        for params in (pool.K, pool.A, pool.P):
            old, new = params[0].detach().flatten(1), params[1].detach().flatten(1)
            assert (old @ old.t() - torch.eye(len(old))).abs().max() > 1e-3   # slice 0 trained away
            assert (new @ old.t()).abs().max() < 1e-5
            assert torch.allclose(new @ new.t(), torch.eye(len(new)), atol=1e-5)
    if built == "up_front":
        torch.set_rng_state(state)
        method.start_session(1)
        again = [p.detach() for pool in pools for p in pool.session_parameters(1)]
        assert all(torch.equal(a, b) for a, b in zip(drawn, again))


@pytest.mark.parametrize("name", ["dualprompt", "coda_prompt", "rebq"])
def test_inference_reads_only_the_seen_sessions_parts(name):
    """Every session's parts exist from the start; inference over `seen` sessions must not
    read the later ones (untrained): changing them changes nothing, and DualPrompt routes
    only among the seen sessions."""
    method = build(name, SMALL_VILT, sessions=3, started=3, **SMALL[name])
    query, mt, mi = batch(SMALL_VILT[1])
    if name == "rebq":
        kwargs = {"memory": {k: v + 1.0 for k, v in query.items()}}
    else:
        kwargs = {}
    def prompts(seen):
        p = method(query, mt, mi, seen=seen, **kwargs).prompts
        return prompt_tensors(p)
    before = prompts(2)
    with torch.no_grad():
        for p in method.session_parameters(2):
            if all(p is not q for q in method.session_parameters(0)):   # not shared (G-prompt)
                p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, prompts(2)))
    assert not all(torch.equal(a, b) for a, b in zip(before, prompts(3)))
    if name == "dualprompt":
        keys = torch.stack(list(method.e_keys)).detach()
        routed = method({"cls": keys[[2, 2, 1, 0]]}, mt[:4], mi[:4], seen=2).routed
        assert set(routed.tolist()) <= {0, 1} and routed[2:].tolist() == [1, 0]


def test_orthogonal_rows_warns_when_the_width_cannot_hold_them():
    with pytest.warns(UserWarning, match="do not fit"):
        rows = orthogonal_rows(3, 4, torch.eye(4)[:2])
    assert torch.allclose(rows.norm(dim=1), torch.ones(3))


# ---- what each method picks ------------------------------------------------------------------

@pytest.mark.parametrize("position", ["input", "prefix"])
def test_map_gives_each_sample_the_prompt_of_its_missing_case(position):
    method = build("map", SMALL_VILT, position=position, **SMALL["map"])
    query, mt, mi = batch(SMALL_VILT[1])                          # complete, text missing, image missing, ...
    out = method(query, mt, mi)
    table = method.prompts["joint_1"]                              # (3 cases, L, d)
    for row, case in enumerate([0, 1, 2, 0, 1, 2]):
        got = out.prompts.input[("joint", 1)][row] if position == "input" else \
            torch.cat([t[row] for t in out.prompts.prefix[("joint", 1)]])
        assert torch.equal(got, table[case])
    assert not torch.equal(table[1], table[2])                     # the cases start apart
    with pytest.raises(ValueError, match="both modalities"):
        method(query, torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool))


def test_msp_drops_the_prompt_of_a_missing_modality():
    method = build("msp", SMALL_VILT, **SMALL["msp"])
    query, mt, mi = batch(SMALL_VILT[1])
    rows = method(query, mt, mi).prompts.input[("joint", 0)]       # (B, 2L, d): text rows, image rows
    text, image = rows[:, :16], rows[:, 16:]
    assert torch.equal(text[0], method.text["joint_0"]) and torch.equal(image[0], method.image["joint_0"])
    assert (text[1] == 0).all() and torch.equal(image[1], method.image["joint_0"])
    assert torch.equal(text[2], method.text["joint_0"]) and (image[2] == 0).all()
    mask = method(query, mt, mi).prompts.input_mask[("joint", 0)]
    assert mask[1].tolist() == [False] * 16 + [True] * 16
    kept = build("msp", SMALL_VILT, missing="keep", **SMALL["msp"])(query, mt, mi).prompts.input[("joint", 0)]
    assert (kept[1, :16] != 0).all()


def test_dualprompt_routes_a_query_equal_to_a_sessions_key_to_that_session():
    method = build("dualprompt", SMALL_CLIP, started=3)
    keys = torch.stack(list(method.e_keys)).detach()
    order = [2, 0, 1, 2]
    query = {"cls": keys[order]}
    f = torch.zeros(4, dtype=torch.bool)
    out = method(query, f, f)
    assert out.routed.tolist() == order
    for row, k in enumerate(order):   # each sample's E rows are its session's
        key_rows = out.prompts.prefix[("image", 2)][0][row]
        assert torch.equal(key_rows, method.e_prompts[k]["image_2"][:5])
    ext = build("dualprompt", SMALL_CLIP, started=3, routing="task_id")
    assert ext(query, f, f, task_ids=torch.tensor([1, 1, 0, 0])).routed.tolist() == [1, 1, 0, 0]
    assert build("dualprompt", SMALL_CLIP)(query, f, f, 0).routed is None   # training: no routing


@pytest.mark.parametrize("target", ["frozen", "memory"])
def test_rebq_reconstruction_loss_decreases_on_a_toy_batch(target):
    """Against the frozen query (the default) it falls; against the code's memory-pass output
    of the original, in this additive stand-in, the shared memory term cancels and it does not."""
    method = build("rebq", SMALL_VILT, sessions=2, reconstruction_target=target, **SMALL["rebq"])
    query, mt, mi = batch(SMALL_VILT[1])
    source, dropped = augmentation(mt, mi)
    assert source.tolist() == [0, 0, 3, 3] and dropped.tolist() == [DROP_TEXT, DROP_IMAGE] * 2

    def loss():
        rows, mt_all, mi_all, memory, aug = rebq_step_inputs(method, SMALL_VILT, 0)
        return method(rows, mt_all, mi_all, 0, memory=memory, augmented=aug).losses["rebq_reconstruction"][1]
    memory_params = [p for pool in method.memory_pools.values() for p in pool.session_parameters(0)]
    first, last = sgd_on(memory_params, loss, steps=20, lr=0.05, adam=True)
    assert last < 0.3 * first if target == "frozen" else last > first


def test_rebq_queries_a_missing_modality_with_its_reconstruction():
    method = build("rebq", SMALL_CLIP, sessions=2, **SMALL["rebq"])
    query, mt, mi = batch(SMALL_CLIP[1])              # rows 1, 4 text missing; 2, 5 image missing
    memory = {k: v + 1.0 for k, v in query.items()}
    base = method(query, mt, mi, memory=memory).prompts.prefix
    moved = dict(memory, text=memory["text"] + 1.0)
    after = method(query, mt, mi, memory=moved).prompts.prefix
    text_site, image_site = ("text", 0), ("image", 0)
    changed = (after[text_site][0] != base[text_site][0]).flatten(1).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert torch.equal(after[image_site][0], base[image_site][0])
    with pytest.raises(ValueError, match="memory pass"):
        method(query, mt, mi)
    assert not RebQ.needs_memory(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))


ALTERNATIVES = {   # the other position each method offers: (settings, {site kind: rows per sample})
    "map": ({"position": "prefix"}, {"prefix": 8}), "msp": ({"position": "prefix"}, {"prefix": 16}),
    "l2p": ({"position": "prefix"}, {"prefix": 25}), "dualprompt": ({"position": "input"}, {"input": 5}),
    "coda_prompt": ({"position": "input"}, {"input": 8}),
    "rebq": ({"position": "input", "memory_position": "prefix"}, {"input": 8}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_other_position_gives_rows_of_the_documented_count(name):
    settings, want = ALTERNATIVES[name]
    small = dict(SMALL[name], **settings)
    if name in ("map", "msp", "coda_prompt", "rebq"):
        small["layers"] = [0]
    if name == "rebq":
        small["memory_layers"] = [0]
    method = build(name, SMALL_CLIP, sessions=2, started=2, **small)
    (kind, rows), = want.items()
    p = forward(method, SMALL_CLIP, None if name != "rebq" else 1).prompts
    got = p.input if kind == "input" else p.prefix
    assert got and not (p.prefix if kind == "input" else p.input)
    for (encoder, _), t in got.items():
        width = 16 if encoder == "text" else 24
        for x in (t,) if kind == "input" else t:
            assert x.shape == (6, rows, width)
    if name == "rebq":
        mem = method.memory_prompts(*batch(SMALL_CLIP[1])).prompts
        assert {s: k.shape for s, (k, _) in mem.prefix.items()} == \
            {("text", 0): (6, 4, 16), ("image", 0): (6, 4, 24)}


@pytest.mark.parametrize("position", ["input", "prefix"])
def test_msp_marks_dropped_rows_for_the_hooks(position):
    method = build("msp", SMALL_VILT, position=position, **SMALL["msp"])
    query, mt, mi = batch(SMALL_VILT[1])
    p = method(query, mt, mi).prompts
    mask = (p.input_mask if position == "input" else p.prefix_mask)[("joint", 0)]
    n = 16 if position == "input" else 8                          # rows per modality (prefix: keys)
    assert mask[0].tolist() == [True] * 2 * n
    assert mask[1].tolist() == [False] * n + [True] * n           # text missing
    assert mask[2].tolist() == [True] * n + [False] * n           # image missing
    assert not (p.prefix_mask if position == "input" else p.input_mask)
