"""CLIP from transformers as a frozen backbone with two encoders.

Real recipes load `from_pretrained(path_or_id)` (model, tokenizer, image processor's mean and
std). Without one, a tiny random `CLIPConfig` is built from `backbone.tiny` (hidden_size,
num_hidden_layers, num_attention_heads, intermediate_size, patch_size for both encoders;
keys prefixed text_ or vision_ for one encoder, e.g. text_hidden_size; projection_dim) with
the offline WordPiece tokenizer, whose [SEP] id is the config's end-of-text id: CLIP pools
the text at the first end-of-text token.

Inputs. Missing text is the empty string (tokenized to start + end-of-text, padded). Missing
image is a white image through CLIP's normalisation, as the MoRA code feeds it:
(1 - mean) / std = (1.93, 2.07, 2.15) per channel with OpenAI's statistics (ViLT's dummy is
all ones). The pooled feature the heads eat is [image_embeds, text_embeds] (the projections,
not normalised, as MoRA's head), so hidden_size = 2 x projection_dim.

DeLo on two encoders (method `delo`, default targets q_proj, k_proj, v_proj of every layer of
both encoders). Every adapted linear keeps DeLo's two pools, sized to its own encoder's
width. Inside the vision encoder the visual pool is routed by the mean of the layer input
over its tokens ([CLS] + patches) and the textual pool by a text query from outside; inside
the text encoder the textual pool by the mean over the real text tokens and the visual pool
by an image query from outside. The outside ("guide") query for layer l is the other
encoder's layer-l query: the mean of that layer's normalised input in an adapter-free pass
of both encoders (`backbone.guide_query=layer_matched`, the default: one more frozen forward
per step, at training and at inference), the closest analogue of ViLT, where layer l's pools
see layer-l tokens. `guide_query=first_layer` gives every layer the other encoder's layer-0
query instead (only an embedding pass; the query first-layer task identification uses). On the synthetic
quickstart (tiny CLIP, seeds 0 and 1) layer_matched gave AP 58.07 / 55.21 against 50.78 /
52.34 for first_layer, at about 1.25x the wall time. Either query is carried into this
encoder's width by a fixed map through CLIP's joint space: text -> image pinv(W_v) W_t,
image -> text pinv(W_t) W_v (W_v, W_t: CLIP's visual and text projections). A router is
linear in its query, so a fixed full-rank map only re-parameterises it; going through the
joint space keeps CLIP's own alignment. The cross-modal guide then works as on ViLT: a
sample missing its image routes the visual pools (in both encoders) with the text query, one
missing its text routes the textual pools with the image query. Task keys: both first-layer
queries projected into the joint space (query_dim = projection_dim).

Prompts (prompts.py) go into either encoder, sites ("text", l) and ("image", l): input tokens
after [BOS] / [CLS] (the text encoder's mask stays causal: a prompt sees [BOS] and the prompts
before it, text tokens see all prompts; EOS pooling is unchanged), prefix rows before the keys
and values of `ClipPrefixAttention` (SDPA or eager, as the config says). `frozen_query`:
"image" = the vision [CLS] after post_layernorm (B, d_v), "text" = the EOS token's final
hidden state after final_layer_norm (B, d_t), "cls" = their projected pair, the pooled
feature [image_embeds, text_embeds] (B, 2 x projection_dim): CLIP's joint space, where the two
modalities are comparable.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.models.clip import modeling_clip

from delo_dist.models.adapters import masked_mean
from delo_dist.models.backbone import Backbone, IdentificationLayer, LinearSite, select_targets
from delo_dist.models.inputs import decode_image, labels_tensor
from delo_dist.models.offline_vocab import offline_tokenizer
from delo_dist.models.prompts import PromptHooks, with_prefix
from delo_dist.plugins import BenchEntry

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIPImageProcessor's defaults
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_SITE = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")


class ClipPrefixAttention(modeling_clip.CLIPAttention):
    """CLIPAttention (its SDPA or eager interface, as the config says), plus prefix keys and
    values (prompts.py): rows (B, P, d) prepended to the projected keys and values before the
    head split. Without a prefix it is transformers' forward itself."""
    prompt_hooks = None   # PromptHooks of the encoder (set by the backbone), and this layer
    prompt_layer = -1

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        prefix = None if self.prompt_hooks is None else self.prompt_hooks.prefix(self.prompt_layer)
        if prefix is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        b, n, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        k, v = with_prefix(prefix, k, v)                                    # (B, P + N, d)
        split = lambda t: t.view(b, t.shape[1], -1, self.head_dim).transpose(1, 2)  # noqa: E731
        attend = modeling_clip.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_clip.eager_attention_forward)
        # the prompt hooks gave an explicit (B, 1, N, P + N) mask: no is_causal shortcut
        out, weights = attend(self, split(q), split(k), split(v), attention_mask,
                              scaling=self.scale, dropout=self.dropout if self.training else 0.0,
                              **{**kwargs, "is_causal": False})
        return self.out_proj(out.reshape(b, n, -1).contiguous()), weights


def _unified_attention() -> bool:
    """Whether this transformers' CLIP layers pass one mask to an attention interface (5.x);
    older ones pass a separate causal mask, which the prompt hooks do not rebuild."""
    return (hasattr(modeling_clip, "ALL_ATTENTION_FUNCTIONS") and "causal_attention_mask"
            not in inspect.signature(modeling_clip.CLIPEncoderLayer.forward).parameters)


@dataclass
class ClipSettings:
    """backbone.clip.*"""
    # where an encoder takes the other modality's query, for methods that route by it (DeLo):
    # the same layer's input in an adapter-free pass (one more frozen forward), or layer 0's
    guide_query: Literal["layer_matched", "first_layer"] = "layer_matched"


class ClipBackbone(Backbone):
    name = "clip"
    Settings = ClipSettings
    # two encoders, one modality each; the other modality's query given from outside; prompts
    # only where this transformers' CLIP layers take one mask (an older one: none, prompts.py),
    # decided here once, so checks made before any model exists read the same
    capabilities = frozenset({"two_encoders"} | (
        {"prompt_input", "prompt_prefix"} if _unified_attention() else set()))
    default_dummy_image = "white"  # a white image through CLIP's normalisation (the MoRA code)
    bench = BenchEntry(full={  # python -m delo_dist.bench --full: ViT-B/16 and its text encoder
        "backbone.tiny.hidden_size": 768, "backbone.tiny.num_hidden_layers": 12,
        "backbone.tiny.num_attention_heads": 12, "backbone.tiny.intermediate_size": 3072,
        "backbone.image_size": 224, "backbone.tiny.patch_size": 16, "backbone.max_text_len": 77,
        "backbone.tiny.text_hidden_size": 512, "backbone.tiny.text_num_attention_heads": 8,
        "backbone.tiny.text_intermediate_size": 2048, "backbone.tiny.projection_dim": 512})

    def __init__(self, cfg, ctx):
        super().__init__()
        self.ctx = ctx
        mean, std = OPENAI_MEAN, OPENAI_STD
        if cfg.pretrained:
            try:
                self.clip = CLIPModel.from_pretrained(cfg.pretrained)
                self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
            except OSError as e:
                raise ValueError(f"backbone.pretrained: cannot load {cfg.pretrained!r} as CLIP "
                                 f"(a folder with config.json, weights and tokenizer, or a hub "
                                 f"id reachable from here): {e}") from e
            try:
                from transformers import CLIPImageProcessor
                proc = CLIPImageProcessor.from_pretrained(cfg.pretrained)
                mean, std = tuple(proc.image_mean), tuple(proc.image_std)
            except OSError:
                pass  # no preprocessor_config.json: OpenAI's statistics
        else:
            self.tokenizer = offline_tokenizer()
            self.clip = CLIPModel(self.tiny_config(cfg, self.tokenizer))
        text_cfg, vision_cfg = self.clip.config.text_config, self.clip.config.vision_config
        if cfg.max_text_len > text_cfg.max_position_embeddings:
            raise ValueError(f"backbone.max_text_len: {cfg.max_text_len} exceeds this CLIP's "
                             f"{text_cfg.max_position_embeddings} text positions")
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.max_text_len = cfg.max_text_len
        self.image_size = vision_cfg.image_size
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        # the same statistics on the CPU, where images are decoded and normalised (not buffers:
        # they stay there whatever device the model moves to)
        self._mean_cpu = torch.tensor(mean).view(3, 1, 1)
        self._std_cpu = torch.tensor(std).view(3, 1, 1)
        p = self.clip.config.projection_dim
        self.hidden_size, self.query_dim = 2 * p, p
        self.targets = list(cfg.targets or ["q_proj", "k_proj", "v_proj"])
        # Fixed maps between the encoders' widths through the joint space (see the docstring).
        w_v = self.clip.visual_projection.weight.float()   # (p, d_v)
        w_t = self.clip.text_projection.weight.float()     # (p, d_t)
        self.register_buffer("text_to_image", torch.linalg.pinv(w_v) @ w_t, persistent=False)
        self.register_buffer("image_to_text", torch.linalg.pinv(w_t) @ w_v, persistent=False)
        self.guide_query, self._guide = (cfg.settings or ClipSettings()).guide_query, None
        for encoder, model in (("text", self.clip.text_model), ("image", self.clip.vision_model)):
            for i, layer in enumerate(model.encoder.layers):
                layer.register_forward_pre_hook(
                    lambda mod, args, e=encoder, i=i: self._set_guide(mod, args, e, i))
        self.prompt_hooks = self._install_prompts(ctx) if "prompt_input" in self.capabilities else []

    def _install_prompts(self, ctx) -> list[PromptHooks]:
        """Prompt hooks on each encoder (prompts.py); the text encoder's masks are causal."""
        hooks = []
        for name, model in (("text", self.clip.text_model), ("image", self.clip.vision_model)):
            layers = model.encoder.layers
            for layer in layers:
                layer.self_attn.__class__ = ClipPrefixAttention  # same parameters, + prefix
            hooks.append(PromptHooks(ctx, name, model.encoder, layers,
                                     [layer.self_attn for layer in layers],
                                     model.config.hidden_size, causal=name == "text",
                                     encoders=("text", "image")))
        return hooks

    @staticmethod
    def tiny_config(cfg, tokenizer) -> CLIPConfig:
        """Both encoders from the shared shape keys of backbone.tiny; a key prefixed text_ or
        vision_ (text_hidden_size, text_num_attention_heads, ...) sets one encoder only."""
        t = cfg.tiny
        shape = {k: t[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size")}
        own = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        text = dict(shape, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_text_len,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                    eos_token_id=tokenizer.sep_token_id)   # pooling finds the end of text
        text.update(own("text_"))
        if text["eos_token_id"] == 2:  # 2 switches CLIP to a legacy argmax pooling
            raise RuntimeError("offline tokenizer: [SEP] must not have id 2 for CLIP's pooling")
        vision = dict(shape, image_size=cfg.image_size, patch_size=t["patch_size"], **own("vision_"))
        return CLIPConfig(text_config=text, vision_config=vision,
                          projection_dim=t.get("projection_dim", t["hidden_size"]))

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, adapters inside included (they drop out only
        return self       # while gradients flow: MoRA, MAIL)

    def adapted_linears(self, targets=None):
        linears = {n: m for n, m in self.named_modules() if isinstance(m, torch.nn.Linear)
                   and _SITE.search(n)}
        return select_targets(linears, targets or self.targets)

    def linear_site(self, name: str) -> LinearSite:
        m = _SITE.search(name)
        if m is None:
            raise ValueError(f"{name} is not a linear inside a CLIP encoder layer")
        enc = self.clip.text_model if m.group(1) == "text" else self.clip.vision_model
        modality = "text" if m.group(1) == "text" else "image"
        return LinearSite(modality, int(m.group(2)), len(enc.encoder.layers), m.group(3))

    # ---------------------------------------------------------------- inputs
    def collate(self, samples: list[dict]) -> dict:
        """samples: dicts with key, jpg (bytes), txt (str), label, session, status."""
        texts, pixels = [], []
        dummy = self.dummy_pixels()
        for s in samples:
            text_missing, image_missing = s["status"] == 1, s["status"] == 2
            texts.append("" if text_missing else s["txt"])  # dummy text: the empty string
            pixels.append(dummy if image_missing else
                          self.normalize_pixels(decode_image(s["jpg"], self.image_size)))
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_text_len, return_tensors="pt")
        status = torch.tensor([s["status"] for s in samples])
        return {
            "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "pixel_values": torch.stack(pixels),
            "missing_text": status == 1, "missing_image": status == 2,
            "session": torch.tensor([s["session"] for s in samples]),
            "labels": labels_tensor(samples), "keys": [s["key"] for s in samples],
        }

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean_cpu) / self._std_cpu

    # ---------------------------------------------------------------- forward
    def _first_layer_means(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_v, q_t) in the encoders' own widths: layer 0's normalised input, averaged over
        the image tokens / the real text tokens. No adapter acts before it."""
        vm, tm = self.clip.vision_model, self.clip.text_model
        h_v = vm.pre_layrnorm(vm.embeddings(batch["pixel_values"]))
        q_v = vm.encoder.layers[0].layer_norm1(h_v).mean(1)
        h_t = tm.encoder.layers[0].layer_norm1(tm.embeddings(input_ids=batch["input_ids"]))
        return q_v, masked_mean(h_t, batch["attention_mask"].bool())

    def _layer_means(self, batch: dict) -> tuple[list, list]:
        """Per layer l, the mean of layer l's normalised input in an adapter-free pass of each
        encoder (`backbone.guide_query=layer_matched`)."""
        vm, tm = self.clip.vision_model, self.clip.text_model
        enabled, self.ctx.enabled = self.ctx.enabled, False
        try:
            hv = vm(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
            ht = tm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states
        finally:
            self.ctx.enabled = enabled
        mask = batch["attention_mask"].bool()
        q_v = [layer.layer_norm1(h).mean(1) for layer, h in zip(vm.encoder.layers, hv)]
        q_t = [masked_mean(layer.layer_norm1(h), mask) for layer, h in zip(tm.encoder.layers, ht)]
        return q_v, q_t

    def _guide_queries(self, batch: dict) -> dict[str, list]:
        """Each modality's per-layer queries, carried into the other encoder's width."""
        if self.guide_query == "layer_matched":
            q_v, q_t = self._layer_means(batch)
        else:
            q_v, q_t = ([q] for q in self._first_layer_means(batch))
        return {"image": [q @ self.image_to_text.t() for q in q_v],
                "text": [q @ self.text_to_image.t() for q in q_t]}

    def _set_guide(self, module, args, encoder: str, layer: int) -> None:
        """Forward pre-hook of every encoder layer: the other modality's query for this layer."""
        if self._guide is not None:
            other = self._guide["image" if encoder == "text" else "text"]
            query = other[min(layer, len(other) - 1)]
            if encoder == "text":
                self.ctx.image_query = query
            else:
                self.ctx.text_query = query

    def forward(self, batch: dict) -> torch.Tensor:
        ctx = self.ctx
        with torch.no_grad():
            self._guide = self._guide_queries(batch) if ctx.enabled and self.guide_queries else None
        pixels, mask = batch["pixel_values"], batch["attention_mask"]
        B = pixels.shape[0]
        try:  # each encoder sees one modality; the other's query is given from outside
            n_v = self.clip.vision_model.embeddings.num_positions
            ctx.cached_input = ctx.cached_queries = None
            ctx.image_tokens = torch.ones(B, n_v, dtype=torch.bool, device=pixels.device)
            ctx.text_tokens = ctx.image_query = None
            vision = self.clip.vision_model(pixel_values=pixels)   # pooled: [CLS], post-norm
            image = self.clip.visual_projection(vision.pooler_output)
            ctx.cached_input = ctx.cached_queries = None
            ctx.text_tokens, ctx.image_tokens, ctx.text_query = mask.bool(), None, None
            words = self.clip.text_model(input_ids=batch["input_ids"], attention_mask=mask)
            text = self.clip.text_projection(words.pooler_output)  # pooled: EOS, final norm
        finally:
            self._guide = None
            ctx.text_query = ctx.image_query = None
            ctx.cached_input = ctx.cached_queries = None
        pooled = torch.cat([image, text], dim=-1)
        if not ctx.enabled or self._capture is not None:  # frozen_query / prompted_query
            self._remember_frozen(batch, {"image": vision.pooler_output, "text": words.pooler_output,
                                          "cls": pooled, "pooled": pooled})
        return pooled

    def identification_layers(self) -> list[IdentificationLayer]:
        """Every layer's output of each encoder, averaged over that encoder's own tokens
        (image: [CLS] + patches; text: the real tokens): `forward` sets those masks in ctx."""
        sites = []
        for encoder, model in (("image", self.clip.vision_model), ("text", self.clip.text_model)):
            layers, d = model.encoder.layers, model.config.hidden_size
            sites += [IdentificationLayer(m, encoder, i, len(layers), ((encoder, d),))
                      for i, m in enumerate(layers)]
        return sites

    def frozen_query_dims(self) -> dict[str, int]:
        c = self.clip.config
        return {"image": c.vision_config.hidden_size, "text": c.text_config.hidden_size,
                "cls": self.hidden_size, "pooled": self.hidden_size}

    @torch.no_grad()
    def first_layer_queries(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_v, q_t) projected into CLIP's joint space (B, projection_dim): task-key queries.
        Like ViLT's, it leaves the token masks in ctx (each encoder's real tokens), so token
        counts can weight the two queries; `forward` sets its own masks per encoder."""
        q_v, q_t = self._first_layer_means(batch)
        n_v = self.clip.vision_model.embeddings.num_positions
        self.ctx.image_tokens = torch.ones(len(q_v), n_v, dtype=torch.bool, device=q_v.device)
        self.ctx.text_tokens = batch["attention_mask"].bool()
        return self.clip.visual_projection(q_v), self.clip.text_projection(q_t)
