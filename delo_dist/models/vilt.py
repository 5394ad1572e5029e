"""ViLT from transformers as a frozen backbone.

Real recipes load `from_pretrained(path_or_id)` (model and tokenizer). Without one, a tiny
random config is built with an offline WordPiece vocabulary (special tokens, the synthetic
benchmark's words, and single characters so that any text still tokenizes).
Tokens are laid out [text (max_text_len), image (1 + patches)]; the combined mask ViLT's
embeddings return tells us which positions are real tokens of which modality.
Prompts (prompts.py) go into its one encoder, sites ("joint", l): input tokens after the text
[CLS] (pooling at [CLS] and the text position table untouched), prefix rows in either attention
(vilt_sdpa.py). `frozen_query`: "cls" = "text_cls" = the final [CLS] after the last layer norm
(the pooler's input), "image_cls" = the image [CLS] of the same sequence, (B, d) each.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from transformers import AutoTokenizer, ViltConfig, ViltModel

from delo_dist.models.backbone import Backbone, IdentificationLayer, LinearSite, select_targets
from delo_dist.models.inputs import labels_tensor
from delo_dist.models.offline_vocab import offline_tokenizer
from delo_dist.models.prompts import PromptHooks
from delo_dist.models.vilt_sdpa import install_attention
from delo_dist.plugins import BenchEntry, BenchVariant

IMAGE_MEAN = IMAGE_STD = 0.5  # ViLT's image processor normalisation


@dataclass
class ViltSettings:
    """backbone.vilt.*"""
    # self-attention: torch's fused SDPA or transformers' matmul + softmax (same result)
    attention: Literal["sdpa", "eager"] = "sdpa"
    # longer than the position table (pretrained ViLT: 40): how the table grows
    text_position_rule: Literal["resample", "extend"] = "resample"


class ViltBackbone(Backbone):
    name = "vilt"
    Settings = ViltSettings
    # one stream holding both modalities' tokens (masks per modality); layer 0's input norm
    capabilities = frozenset({"single_stream", "modality_tokens", "first_layer_module",
                              "prompt_input", "prompt_prefix"})
    default_dummy_image = "ones"  # all ones after normalisation: the MAP convention DeLo keeps
    bench = BenchEntry(  # python -m delo_dist.bench: the attention and loader targets
        variants={"eager": BenchVariant({"backbone.vilt.attention": "eager"}, rows=("frozen",))},
        ratios={"vilt_sdpa_over_eager": ("frozen/vilt", "frozen/vilt_eager", ("<", 1.0)),
                "loader_over_reference": ("loader/vilt_reference", "loader/vilt", (">=", 3.0))},
        full={"backbone.tiny.hidden_size": 768, "backbone.tiny.num_hidden_layers": 12,  # B/32
              "backbone.tiny.num_attention_heads": 12, "backbone.tiny.intermediate_size": 3072,
              "backbone.image_size": 384, "backbone.tiny.patch_size": 32},
        loader_reference="delo_dist.bench.loader:vilt_processor")

    def __init__(self, cfg, ctx):
        super().__init__()
        self.ctx = ctx
        self.max_text_len = cfg.max_text_len
        self.image_size = cfg.image_size
        if cfg.pretrained:
            try:
                self.vilt = ViltModel.from_pretrained(cfg.pretrained)
                self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
            except OSError as e:
                raise ValueError(f"backbone.pretrained: cannot load {cfg.pretrained!r} "
                                 f"(a folder with config.json, weights and tokenizer, or a hub "
                                 f"id reachable from here): {e}") from e
        else:
            self.tokenizer = offline_tokenizer()
            tiny = {"max_position_embeddings": cfg.max_text_len, **cfg.tiny}
            config = ViltConfig(**tiny, image_size=cfg.image_size,
                                vocab_size=len(self.tokenizer), max_image_length=-1)
            self.vilt = ViltModel(config)
        own = cfg.settings or ViltSettings()
        extend_text_positions(self.vilt, cfg.max_text_len, own.text_position_rule)
        install_attention(self.vilt, own.attention)  # transformers' ViLT has no SDPA of its own
        self.vilt.requires_grad_(False)
        self.vilt.eval()  # frozen: no dropout, whatever mode the wrapper is in
        self.hidden_size = self.query_dim = self.vilt.config.hidden_size
        self.targets = list(cfg.targets or ["query", "key", "value"])
        self.vilt.embeddings.register_forward_hook(self._capture_token_masks)
        self._text_len = 0
        layers = self.vilt.encoder.layer  # prompts.py: input prompts and prefixes, one encoder
        self.prompt_hooks = [PromptHooks(ctx, "joint", self.vilt.encoder, layers,
                                         [layer.attention.attention for layer in layers],
                                         self.hidden_size)]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vilt.eval()
        return self

    def _capture_token_masks(self, module, inputs, output):
        _, mask = output  # (B, N): 1 for real tokens, text first then image
        mask = mask.bool()
        pos = torch.arange(mask.shape[1], device=mask.device)
        self.ctx.text_tokens = mask & (pos < self._text_len)
        self.ctx.image_tokens = mask & (pos >= self._text_len)

    def linear_site(self, name: str) -> LinearSite:
        m = re.search(r"encoder\.layer\.(\d+)\.(.+)$", name)
        if m is None:
            raise ValueError(f"{name} is not a linear inside a ViLT encoder layer")
        return LinearSite("joint", int(m.group(1)), len(self.vilt.encoder.layer), m.group(2))

    def adapted_linears(self, targets=None):
        linears = {n: m for n, m in self.named_modules() if isinstance(m, torch.nn.Linear)}
        return select_targets(linears, targets or self.targets)

    # ---------------------------------------------------------------- inputs
    def collate(self, samples: list[dict]) -> dict:
        """samples: dicts with key, jpg (bytes), txt (str), label, session, status."""
        texts, size = [], self.image_size
        pixels = torch.empty(len(samples), 3, size, size)  # filled in place: no stack copy
        dummy = None
        for i, s in enumerate(samples):
            text_missing, image_missing = s["status"] == 1, s["status"] == 2
            texts.append("" if text_missing else s["txt"])  # dummy text: the empty string
            if image_missing:  # dummy image: the method's (dummy_pixels)
                dummy = self.dummy_pixels() if dummy is None else dummy
                pixels[i] = dummy
            else:
                self._image_tensor(s["jpg"], out=pixels[i])
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_text_len, return_tensors="pt")
        status = torch.tensor([s["status"] for s in samples])
        return {
            "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "pixel_values": pixels,
            "missing_text": status == 1, "missing_image": status == 2,
            "session": torch.tensor([s["session"] for s in samples]),
            "labels": labels_tensor(samples), "keys": [s["key"] for s in samples],
        }

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - IMAGE_MEAN) / IMAGE_STD

    def _image_tensor(self, jpg: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        img = Image.open(io.BytesIO(jpg))
        img.draft("RGB", (self.image_size, self.image_size))  # cheap JPEG downscale on decode
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        # One uint8 -> float copy into a contiguous (3, H, W) tensor, normalised in place:
        # half the loader's CPU time went to the strided float arithmetic this replaces.
        hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        hwc = hwc.view(self.image_size, self.image_size, 3).permute(2, 0, 1)
        out = torch.empty(hwc.shape) if out is None else out
        return out.copy_(hwc).mul_(1.0 / (255.0 * IMAGE_STD)).sub_(IMAGE_MEAN / IMAGE_STD)

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict) -> torch.Tensor:
        self._text_len = batch["input_ids"].shape[1]
        out = self.vilt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"],
                        pixel_mask=torch.ones_like(batch["pixel_values"][:, 0], dtype=torch.long))
        if not self.ctx.enabled or self._capture is not None:  # frozen_query / prompted_query
            h = out.last_hidden_state  # (B, N, d) after the last layer norm; text first
            cls = h[:, 0]              # the text [CLS] serves as both (one copy kept)
            self._remember_frozen(batch, {"cls": cls, "text_cls": cls,
                                          "image_cls": h[:, self._text_len],
                                          "pooled": out.pooler_output})
        return out.pooler_output

    def frozen_query_dims(self) -> dict[str, int]:
        return dict.fromkeys(("cls", "text_cls", "image_cls", "pooled"), self.hidden_size)

    def first_layer_module(self) -> torch.nn.Module:
        return self.vilt.encoder.layer[0].layernorm_before

    def identification_layers(self) -> list[IdentificationLayer]:
        """Every encoder layer's output (hidden_states[i + 1]); one stream holds both
        modalities: an image-token and a text-token mean per layer."""
        layers, d = self.vilt.encoder.layer, self.vilt.config.hidden_size
        return [IdentificationLayer(m, "joint", i, len(layers), (("image", d), ("text", d)))
                for i, m in enumerate(layers)]

    @torch.no_grad()
    def first_layer_queries(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_v, q_t): per-modality means of the first encoder layer's normalised input, the
        queries DeLo's first routers see. No adapter acts before them: cheap and frozen."""
        from delo_dist.models.adapters import masked_mean
        self._text_len = batch["input_ids"].shape[1]
        emb, _ = self.vilt.embeddings(
            batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"],
            torch.ones_like(batch["pixel_values"][:, 0], dtype=torch.long), None, None,
            image_token_type_idx=1)  # the hook has marked text and image tokens in ctx
        h = self.vilt.encoder.layer[0].layernorm_before(emb)
        return masked_mean(h, self.ctx.image_tokens), masked_mean(h, self.ctx.text_tokens)


def extend_text_positions(vilt: ViltModel, n: int, rule: str = "resample") -> None:
    """Give ViLT's text position table (pretrained: 40 rows) n rows, if it has fewer.

    rule "resample" (the reference's: MAP, RebQ and the DeLo code upsample their 40-row
    table when max_text_len is larger): the whole table is resampled to n rows by linear
    interpolation along the position axis (half-pixel centres, as torch's `interpolate`
    with align_corners=False), so every row, the first 40 included, changes.
    rule "extend" (ours): rows 0..old-1 are kept as they are, and row p >= old takes the
    value the "resample" table has at p; short texts then embed exactly as pretrained.
    The position_ids and token_type_ids buffers and config.max_position_embeddings grow
    with the table. Tables already at least n rows long are left alone.
    """
    emb = vilt.embeddings.text_embeddings
    old = emb.position_embeddings.weight
    if n <= old.shape[0]:
        return
    with torch.no_grad():
        resampled = torch.nn.functional.interpolate(
            old.T[None].float(), size=n, mode="linear", align_corners=False)[0].T.to(old.dtype)
        if rule == "extend":
            resampled[:old.shape[0]] = old
    table = torch.nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
    table.weight.data.copy_(resampled)
    table.weight.requires_grad_(old.requires_grad)
    emb.position_embeddings = table
    emb.position_ids = torch.arange(n, device=old.device).expand(1, -1)
    emb.token_type_ids = torch.zeros(1, n, dtype=torch.long, device=old.device)
    vilt.config.max_position_embeddings = n

