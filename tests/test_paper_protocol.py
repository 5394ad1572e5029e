"""The paper's protocol (issue 10): long texts through an enlarged text position table,
the reference's list-text join, the multi-label metric over seen or session classes,
global batch and gradient accumulation, and the trainable counts of the paper's Table 5."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import ViltConfig, ViltModel

from delo_dist.config import BackboneConfig
from delo_dist.models.adapters import RoutingContext
from delo_dist.models.vilt import ViltBackbone, extend_text_positions, offline_tokenizer

TINY_VILT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=16, image_size=32, max_position_embeddings=40, max_image_length=-1)


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pretrained_40(tmp_path_factory):
    """A save_pretrained folder with a 40-row text position table, as dandelin/vilt-b32-mlm."""
    folder = tmp_path_factory.mktemp("vilt40")
    tok = offline_tokenizer()
    torch.manual_seed(0)
    model = ViltModel(ViltConfig(**TINY_VILT, vocab_size=len(tok)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.embeddings.text_embeddings.position_embeddings.weight.detach().clone()


@pytest.mark.parametrize("rule", ["resample", "extend"])
def test_pretrained_40_positions_loads_at_512(pretrained_40, rule):
    folder, table40 = pretrained_40
    cfg = BackboneConfig(pretrained=str(folder), image_size=32, max_text_len=512,
                         text_position_rule=rule)
    bb = ViltBackbone(cfg, RoutingContext())
    emb = bb.vilt.embeddings.text_embeddings
    table = emb.position_embeddings.weight
    assert table.shape == (512, 32) and emb.position_ids.shape == (1, 512)
    assert emb.token_type_ids.shape == (1, 512) and bb.vilt.config.max_position_embeddings == 512
    assert not table.requires_grad
    # the reference's upsampling: a (1, 1, 40, d) image resized to (512, d), bilinear
    reference = torch.nn.functional.interpolate(table40.view(1, 1, 40, 32), size=(512, 32),
                                                mode="bilinear").squeeze()
    if rule == "resample":
        assert torch.allclose(table, reference, atol=1e-6)
        assert not torch.allclose(table[:40], table40)           # every row moves
    else:
        assert torch.equal(table[:40], table40)                  # pretrained rows kept
        assert torch.allclose(table[40:], reference[40:], atol=1e-6)
    long_text = " ".join(["red circle"] * 400)                   # ~800 tokens: cut at 512
    batch = bb.collate([{"key": f"k{i}", "jpg": _jpeg(), "txt": long_text, "label": 0,
                         "session": 0, "status": s} for i, s in enumerate((0, 1, 2))])
    assert batch["input_ids"].shape == (3, 512) and int(batch["attention_mask"][0].sum()) == 512
    pooled = bb(batch)
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()
    assert int(bb.ctx.text_tokens[0].sum()) == 512 and int(bb.ctx.image_tokens[0].sum()) == 5


def test_tiny_backbone_grows_its_table_too():
    cfg = BackboneConfig(image_size=32, max_text_len=100, tiny={**BackboneConfig().tiny,
                                                                "max_position_embeddings": 40})
    bb = ViltBackbone(cfg, RoutingContext())
    assert bb.vilt.embeddings.text_embeddings.position_embeddings.weight.shape[0] == 100
    vilt = bb.vilt
    extend_text_positions(vilt, 60)                              # shorter: left alone
    assert vilt.config.max_position_embeddings == 100
