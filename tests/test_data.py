"""Synthetic benchmark and streaming: real tars, read back through webdataset."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
from PIL import Image

import pytest

from delo_dist.data.shards import DataIntegrityError, iter_tar_samples, read_manifest
from delo_dist.data.stream import SessionStream, make_loader
from delo_dist.data.synthetic import CUE_ORDER, FLAVOURS, TOPICS, make_synthetic
from tests.conftest import TINY


def identity(samples):
    return [(s["key"], s["status"], s["label"]) for s in samples]


def stream(shards, session=0, split="train", **kw):
    m = read_manifest(shards)
    return SessionStream(shards, m, session, split, kw.pop("batch_size", 8), identity,
                         kw.pop("status", {}), train=split == "train", **kw)


def test_synthetic_is_deterministic_and_laid_out(shards, tmp_path):
    m = read_manifest(shards)
    assert m["num_classes"] == 12 and len(m["sessions"]) == 3
    assert m["sessions"][1]["classes"] == [4, 5, 6, 7]
    assert [m["sessions"][0]["splits"][s]["count"] for s in ("train", "val", "test")] == [64, 8, 32]
    assert len(m["sessions"][0]["splits"]["train"]["shards"]) == 3  # 64 samples, 24 a shard
    again = make_synthetic(tmp_path / "again", progress=False, **TINY)

    def digest(root):
        h = hashlib.sha256()
        for sess in read_manifest(root)["sessions"]:
            for shard in sess["splits"]["train"]["shards"]:
                for s in iter_tar_samples([str(root / shard)]):
                    h.update(s["jpg"] + s["txt"] + s["json"])
        return h.hexdigest()
    assert digest(shards) == digest(again)


def _decode_by_hand(sample, session_flavours, cue):
    """What each modality alone tells: the text's flavour word; the session's image cue."""
    meta = json.loads(sample["json"])
    words = sample["txt"].decode().split()
    text_code = next((session_flavours.index(w) for w in words if w in session_flavours), None)
    img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=float)
    dark, bright = img < 70, img > 190       # shapes: luma < 60 or > 195; backgrounds between
    shape = dark | bright
    if cue == "brightness":
        return meta["label"], text_code, 0 if dark.sum() > bright.sum() else 1
    if cue == "position":
        return meta["label"], text_code, 0 if np.nonzero(shape)[0].mean() < img.shape[0] / 2 else 1
    return meta["label"], text_code, 0 if shape.mean() < 0.2 else 1


def test_label_needs_both_modalities(shards):
    """Both modalities identify the class; either alone leaves it ambiguous."""
    m = read_manifest(shards)
    both = text_only = image_only = n = 0
    for k, sess in enumerate(m["sessions"]):
        flavours = FLAVOURS[2 * k:2 * k + 2]
        for shard in sess["splits"]["test"]["shards"]:
            for s in iter_tar_samples([str(shards / shard)]):
                label, t, i = _decode_by_hand(s, flavours, CUE_ORDER[k % 3])
                j = label - sess["classes"][0]
                guess_t = sess["classes"][0] + 2 * (t or 0)          # image code unknown
                guess_i = sess["classes"][0] + i                     # text code unknown
                both += label == sess["classes"][0] + 2 * (t or 0) + i
                text_only += label == guess_t
                image_only += label == guess_i
                n += 1
                assert TOPICS[k] in s["txt"].decode().split() and j in range(4)
    assert both / n > 0.85                      # 10 % of texts name a wrong flavour
    assert 0.3 < text_only / n < 0.6 and 0.3 < image_only / n < 0.6


def test_train_batches_are_the_same_on_any_world_size(shards):
    """Global batch b of world 1 == concatenation of rank slices of world 2 (and 4)."""
    one = list(stream(shards, batch_size=8, seed=5))
    two = [list(stream(shards, batch_size=4, world=2, rank=r, seed=5)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 64 // 8
    for b, batch in enumerate(one):
        assert batch == two[0][b] + two[1][b]
    other_epoch = list(stream(shards, batch_size=8, seed=5, epoch=1))
    assert [x for b in other_epoch for x in b] != [x for b in one for x in b]  # reshuffled
    assert sorted(x for b in other_epoch for x in b) == sorted(x for b in one for x in b)


def test_three_shards_two_ranks_two_workers_equal_batches(shards):
    """3 shards do not divide by 2 ranks x 2 workers: every rank still gets 8 batches."""
    seen = []
    for r in range(2):
        s = stream(shards, batch_size=4, world=2, rank=r, seed=1)
        batches = list(make_loader(s, num_workers=2))
        assert len(batches) == len(s) == 8
        seen += [tuple(x) for b in batches for x in b]
    assert len(seen) == len(set(seen)) == 64   # each training sample once per epoch


def test_eval_covers_each_sample_once_across_ranks(shards):
    keys = Counter()
    for r in range(3):
        s = stream(shards, split="test", batch_size=5, world=3, rank=r)
        batches = list(make_loader(s, num_workers=2))
        assert len(batches) == len(s)
        keys.update(k for b in batches for k, _, _ in b)
    assert len(keys) == 32 and set(keys.values()) == {1}


def test_resume_skips_whole_global_batches(shards):
    full = list(stream(shards, batch_size=8, seed=2))
    assert list(stream(shards, batch_size=8, seed=2, skip_batches=3)) == full[3:]


def test_missing_status_reaches_the_batch(shards):
    s = stream(shards, status={"s00-train-0000003": 1, "s00-train-0000004": 2})
    got = {k: st for b in s for k, st, _ in b}
    assert got["s00-train-0000003"] == 1 and got["s00-train-0000004"] == 2
    assert sum(got.values()) == 3


def test_a_truncated_tar_stops_the_stream_naming_shard_split_and_counts(shards, tmp_path):
    import shutil
    m = read_manifest(shards)
    root = tmp_path / "broken"
    shutil.copytree(shards, root)
    shard = root / m["sessions"][0]["splits"]["test"]["shards"][0]
    import tarfile
    with tarfile.open(shard) as tf:
        member = tf.getmembers()[len(tf.getmembers()) // 2]
    cut = member.offset_data + member.size // 2          # inside a member's data, as a
    shard.write_bytes(shard.read_bytes()[:cut])          # killed copy leaves a tar
    s = SessionStream(root, read_manifest(root), 0, "test", 8, identity, {}, train=False)
    with pytest.raises(DataIntegrityError) as e:
        sum(len(b) for b in s)
    read = int(str(e.value).split(" samples read")[0].split()[-1])
    assert 0 < read < 32 and "manifest says 32" in str(e.value) and "session 0 test" in str(e.value)
    first = m['sessions'][0]['splits']['test']['shards'][0]           # 24 samples, 8 in the next
    assert f"{first}: {read - 8} read, manifest 24" in str(e.value)
