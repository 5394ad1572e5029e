"""The backbone protocol: what a method may know about a frozen multimodal model.

A backbone is one module holding a `Backbone` subclass, registered by name
(delo_dist/plugins.py). It declares `capabilities` (what methods may ask for: e.g.
"two_encoders", "modality_tokens", "first_layer_module"; a method's `needs` are checked
against them when the recipe loads) and its own recipe section `backbone.<name>.*` (its
Settings), beside the keys every backbone reads (pretrained, tiny, image_size, max_text_len,
targets). Methods never import ViLT or CLIP. A backbone tells them:
  - `adapted_linears()`: the linears to wrap, by qualified name (recipe `backbone.targets`
    selects them by suffix: query, key, value by default);
  - which tokens belong to which modality at each adapted layer: `forward` fills
    `ctx.text_tokens` / `ctx.image_tokens` (bool, (B, N)) before the first layer runs;
  - how to build inputs, dummies for a missing modality included: `collate(samples)`;
  - the pooled feature the heads eat: `forward(batch) -> (B, hidden_size)`;
  - cheap per-modality queries for task identification that no adapter influences:
    `first_layer_queries(batch) -> (q_v, q_t)`, which also leaves the batch's token masks
    in `ctx.text_tokens` / `ctx.image_tokens`;
  - `identification_features(batch)`, adapter-free features for task identification: the
    default here builds them from the two calls above and `self.ctx` (the RoutingContext
    the builder received), so a new backbone needs nothing more; with
    `identification_layers()` (the encoder layers, and which modalities' tokens each holds)
    it also averages every chosen layer's output per modality inside the adapter-free pass
    that yields the pooled feature (forward hooks on that same pass: no extra forward);
  - optionally `first_layer_module()`, the module whose output `first_layer_queries`
    averages: the model then identifies the task inside the main forward pass, no second pass;
  - `linear_site(name)`: where an adapted linear sits (modality of its encoder, layer, role),
    for methods that couple linears across encoders (MoRA);
  - `query_dim`: the width of the task-key queries;
  - prompts (`delo_dist/models/prompts.py`), for prompt methods: `prompt_sites()` lists
    (encoder, layer, width) where prompts can go (encoder "joint" for ViLT, "text" / "image"
    for CLIP); a method sets `ctx.prompts = Prompts(input=..., prefix=...)` for one forward
    and the backbone's hooks insert input tokens after the first token (removed before
    pooling) and prepend prefix rows, in the hidden width, to self-attention keys and values.
    Off (`ctx.prompts` None, `ctx.enabled` False, zero-length prompts), outputs are
    bit-identical to the frozen backbone. Backbones that do this declare the capabilities
    "prompt_input" and "prompt_prefix" (`capabilities`);
  - `frozen_query(batch)`: the features prompt methods query their pools with, from an
    adapter-free and prompt-free pass (ViLT: "cls" = the final first token after the last
    layer norm, "text_cls", "image_cls"; CLIP: "image", "text" and their projected pair
    "cls"; both: "pooled"). The pass is the backbone's `forward` with `ctx.enabled` False: a
    frozen `forward` of the same batch just before (e.g. identification's pooled feature)
    is reused, not run again. `frozen_query_dims()`: their widths, without a forward;
    `prompted_query(batch, prompts)`: the same features from a pass under prompts, with
    gradient to them (RebQ's memory pass);
  - `with_dummy(batch, rows, drop_text)`: rows of a collated batch with one modality replaced
    by exactly the dummy `collate` gives a sample missing it (RebQ trains on such copies).
Two-encoder models (CLIP) implement the same calls; their encoders never see each other's
tokens, so each gives its adapters the other modality's query from outside (clip.py).
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch import nn

from delo_dist.models.adapters import masked_mean
from delo_dist.plugins import Plugin


class LinearSite(NamedTuple):
    modality: str      # "text", "image", or "joint" (a single-stream encoder such as ViLT)
    layer: int         # encoder layer index
    num_layers: int    # layers in that encoder
    role: str          # path inside the layer, e.g. "self_attn.k_proj"


class IdentificationLayer(NamedTuple):
    """An encoder layer whose output the task identifier may average per modality."""
    module: nn.Module                     # output (B, N, d), or a tuple led by it
    encoder: str                          # "joint" (ViLT's single stream), "image", "text"
    index: int                            # layer index inside its encoder
    num_layers: int                       # layers in that encoder
    blocks: tuple[tuple[str, int], ...]   # (modality, width) of each mean, in order


def select_layers(layers: list[IdentificationLayer], spec) -> list[IdentificationLayer]:
    """`task_id.analytic.layers`: "all", "last", "none", or a list of layer indices (negative from the
    end), applied inside each encoder (CLIP: layer i of both)."""
    if spec == "all":
        return list(layers)
    if spec == "none":
        return []
    wanted = [-1] if spec == "last" else list(spec)
    chosen = []
    for site in layers:
        for i in wanted:
            if not -site.num_layers <= i < site.num_layers:
                raise ValueError(f"task_id.analytic.layers: layer {i} does not exist in the {site.encoder} "
                                 f"encoder ({site.num_layers} layers, indices 0..{site.num_layers - 1} "
                                 "or negative from the end)")
        if any(i % site.num_layers == site.index for i in wanted):
            chosen.append(site)
    return chosen


class Backbone(Plugin, nn.Module):
    capabilities: frozenset = frozenset()
    hidden_size: int   # width of the pooled feature the heads eat
    query_dim: int     # width of first_layer_queries' outputs (the first-layer identifiers)
    prompt_hooks: tuple = ()   # prompts.PromptHooks, one per encoder, if it takes prompts
    _frozen = None     # (batch tensors, features) of the last frozen forward: frozen_query
    _capture = None    # a dict while prompted_query runs: forward puts its query features there
    # What a missing image becomes (the method chooses, `Method.dummies`): "ones" / "zeros"
    # after normalisation, "white" through it, "backbone": this backbone's own convention.
    default_dummy_image: str = "ones"
    dummy_image: str = "backbone"
    # Whether a method routes by the other modality's per-layer query (`Method.guide_queries`):
    # two-encoder backbones then compute it in a frozen pass.
    guide_queries: bool = False
    # How `python -m delo_dist.bench` times it: plugins.BenchEntry (its variants, ratios, paper
    # shape, reference loader) or a dict of recipe overrides
    bench = {}

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> what the model eats."""
        raise NotImplementedError

    def dummy_pixels(self, device=None, dtype=None) -> torch.Tensor:
        """(3, H, W): the missing image, as `dummy_image` says (on the CPU in float32, or on
        `device` in `dtype`). Built once per kind, device and dtype: a shared tensor, which
        callers copy from and never modify."""
        kind = self.default_dummy_image if self.dummy_image == "backbone" else self.dummy_image
        key = ("pixels", kind, self.image_size, device and torch.device(device), dtype)
        cache = self._inputs_cache()
        if key not in cache:
            if device is not None or dtype is not None:
                cache[key] = self.dummy_pixels().to(device, dtype)
            else:
                ones = torch.ones(3, self.image_size, self.image_size)
                cache[key] = (self.normalize_pixels(ones) if kind == "white" else
                              ones if kind == "ones" else torch.zeros_like(ones))
        return cache[key]

    def _empty_text(self, length: int, device, ids_dtype, mask_dtype) -> tuple:
        """(input_ids, attention_mask) (1, length) of the empty string, tokenized and padded as
        `collate` does it: the missing text. Built once per length, device and dtypes."""
        key = ("text", length, torch.device(device), ids_dtype, mask_dtype)
        cache = self._inputs_cache()
        if key not in cache:
            tok = self.tokenizer([""], padding="max_length", truncation=True, max_length=length,
                                 return_tensors="pt")
            cache[key] = (tok["input_ids"].to(device, ids_dtype),
                          tok["attention_mask"].to(device, mask_dtype))
        return cache[key]

    def _inputs_cache(self) -> dict:
        """This backbone's built dummy inputs (dummy_pixels, _empty_text)."""
        cache = self.__dict__.get("_dummy_inputs")
        if cache is None:
            cache = self.__dict__["_dummy_inputs"] = {}
        return cache

    def adapted_linears(self, targets: Optional[list[str]] = None) -> dict[str, nn.Linear]:
        """The linears to wrap: by suffix among `targets` (None: the backbone's default)."""
        raise NotImplementedError

    def linear_site(self, name: str) -> LinearSite:
        raise NotImplementedError

    def replace_linear(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent_name), child, module)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def first_layer_queries(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def identification_layers(self) -> list[IdentificationLayer]:
        """The encoder layers whose per-modality token means task identification may read, in
        order ([]: none; the identifier then reads the features above only)."""
        return []

    @torch.no_grad()
    def identification_features(self, batch: dict, pooled: bool = False,
                                layers: list[IdentificationLayer] = ()) -> dict:
        """q_v, q_t (B, d): first-layer per-modality means; q_all (B, d): their mean over all
        real tokens of the sequence (weighted by token counts); pooled (B, hidden_size), if
        asked: `forward` with every adapter off (one extra frozen forward). `layers` (from
        `identification_layers`, pooled pass only): "layers", a list of (B, width) means, one
        per block of each layer in order, read by hooks on that same pass."""
        q_v, q_t = self.first_layer_queries(batch)
        n_v = self.ctx.image_tokens.sum(1, keepdim=True).to(q_v.dtype)
        n_t = self.ctx.text_tokens.sum(1, keepdim=True).to(q_v.dtype)
        feats = {"q_v": q_v, "q_t": q_t, "q_all": (n_v * q_v + n_t * q_t) / (n_v + n_t).clamp(min=1)}
        if layers and not pooled:
            raise ValueError("identification_features: layer means come from the pooled pass")
        if pooled:
            means: dict[int, list] = {}
            hooks = [site.module.register_forward_hook(partial(self._capture_layer_means, means, i, site))
                     for i, site in enumerate(layers)]
            enabled, self.ctx.enabled = self.ctx.enabled, False
            try:
                feats["pooled"] = self.forward(batch)
            finally:
                self.ctx.enabled = enabled
                for h in hooks:
                    h.remove()
            if layers:
                feats["layers"] = [m for i in range(len(layers)) for m in means[i]]
        return feats

    def _capture_layer_means(self, store: dict, i: int, site: IdentificationLayer, module, inputs, out):
        """Forward hook: the layer output's mean over each block's modality tokens, with the
        token masks the pass has set in ctx (ViLT: its embeddings hook; CLIP: per encoder)."""
        h = out[0] if isinstance(out, (tuple, list)) else out                 # (B, N, d)
        masks = {"image": self.ctx.image_tokens, "text": self.ctx.text_tokens}
        store[i] = [masked_mean(h, masks[modality]) for modality, _ in site.blocks]

    def first_layer_module(self) -> nn.Module | None:
        """The module whose output (B, N, d) `first_layer_queries` averages per modality, or
        None. The model hooks it to identify the task inside the main forward pass."""
        return None

    # ------------------------------------------------------------ prompts (prompts.py)
    def prompt_sites(self) -> list:
        """[PromptSite(encoder, layer, width)]: where `ctx.prompts` may put prompts."""
        return [site for hooks in self.prompt_hooks for site in hooks.sites()]

    def frozen_query_dims(self) -> dict[str, int]:
        """{name: width} of what `frozen_query` returns (no forward needed)."""
        raise NotImplementedError

    @torch.no_grad()
    def frozen_query(self, batch: dict) -> dict[str, torch.Tensor]:
        """Features of an adapter-free, prompt-free pass, (B, width) each (see the module
        docstring). A frozen `forward` of this same batch, if it was the last one, is reused."""
        kept = self._frozen
        if kept is None or kept[0]() is not batch["input_ids"] or kept[1]() is not batch["pixel_values"]:
            enabled, self.ctx.enabled = self.ctx.enabled, False
            try:
                self(batch)  # its forward records the features (_remember_frozen)
            finally:
                self.ctx.enabled = enabled
            kept = self._frozen
        return dict(kept[2])

    def prompted_query(self, batch: dict, prompts) -> dict[str, torch.Tensor]:
        """The `frozen_query` features of one pass under `prompts` (prompts.Prompts), with
        gradient to the prompts: the same entries, from the prompted backbone's output."""
        from delo_dist.models.prompts import use_prompts
        self._capture = {}
        try:
            with use_prompts(self.ctx, prompts):
                self(batch)
            return self._capture
        finally:
            self._capture = None

    def _remember_frozen(self, batch: dict, feats: dict) -> None:
        """Called by `forward` in a frozen pass: keep its queries (copies, so the pass's
        activations are freed), keyed by the batch's tensors (weakly: no batch kept alive).
        Inside `prompted_query` (a prompted pass) they are handed over as they are instead."""
        if self.ctx.enabled:
            if self._capture is not None:
                self._capture.update(feats)
            return
        copies: dict[int, torch.Tensor] = {}   # one copy per distinct tensor: entries that
        for v in feats.values():               # were one tensor stay one (CLIP's cls, pooled)
            if id(v) not in copies:
                copies[id(v)] = v.detach().clone()
        feats = {k: copies[id(v)] for k, v in feats.items()}
        self._frozen = (weakref.ref(batch["input_ids"]), weakref.ref(batch["pixel_values"]), feats)

    def with_dummy(self, batch: dict, rows: torch.Tensor, drop_text: torch.Tensor) -> dict:
        """Rows `rows` (A,) of a collated batch, each with one modality replaced by its dummy
        (drop_text (A,) bool: the text, else the image), exactly as `collate` fills a sample
        missing it: the empty string tokenized and padded alike, `dummy_pixels()`."""
        from delo_dist.models.inputs import subset
        out = subset(batch, rows)
        drop_text = drop_text.to(out["missing_text"].device)
        ids, mask, pixels = out["input_ids"], out["attention_mask"], out["pixel_values"]
        empty_ids, empty_mask = self._empty_text(ids.shape[1], ids.device, ids.dtype, mask.dtype)
        out["input_ids"] = torch.where(drop_text[:, None], empty_ids, ids)   # no host sync
        out["attention_mask"] = torch.where(drop_text[:, None], empty_mask, mask)
        drop_image = ~drop_text
        out["pixel_values"] = torch.where(drop_image.to(pixels.device)[:, None, None, None],
                                          self.dummy_pixels(pixels.device, pixels.dtype), pixels)
        out["missing_text"] = out["missing_text"] | drop_text
        out["missing_image"] = out["missing_image"] | drop_image
        return out


def build_backbone(cfg, ctx) -> Backbone:
    from delo_dist.config import plugin_class
    return plugin_class(cfg)(cfg, ctx)


def select_targets(linears: dict[str, nn.Linear], targets: list[str]) -> dict[str, nn.Linear]:
    """Keep linears whose name ends with one of the targets (peft's suffix rule)."""
    chosen = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
    if not chosen:
        raise ValueError(f"backbone.targets {targets} match no linear; some names: "
                         f"{sorted(linears)[:6]}")
    return chosen
