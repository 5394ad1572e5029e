"""`prepare hf`: Hugging Face datasets the test builds with `datasets` (PIL images, texts,
labels) and saves to disk, prepared into shards, read back, and trained on."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from delo_dist.data.prepare import main as prepare_main
from delo_dist.data.prepare import prepare
from delo_dist.data.shards import read_manifest
from delo_dist.data.sources import SourceError
from tests.test_prepare import COLORS, tar_samples, train_one_session

NAMES = ["cat", "dog", "eel", "fox"]


def image(c: int) -> Image.Image:
    return Image.new("RGB", (40, 30), COLORS[c])


@pytest.fixture(scope="module")
def single_label(tmp_path_factory):
    """A DatasetDict train/validation/test: 4 ClassLabel classes, 6/1/2 rows each; one text is
    a list (joined), one empty (dropped), one image missing (dropped)."""
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "animal": datasets.ClassLabel(names=NAMES)})
    parts = {}
    for split, n in (("train", 6), ("validation", 1), ("test", 2)):
        rows = {"img": [], "caption": [], "animal": []}
        for c in range(4):
            for i in range(n):
                rows["img"].append(image(c))
                rows["caption"].append(f"a {NAMES[c]} number {i}")
                rows["animal"].append(c)
        parts[split] = rows
    parts["train"]["caption"][1] = ""                        # cat, train row 1: no text
    parts["train"]["img"][7] = None                          # dog, train row 1: no image
    folder = tmp_path_factory.mktemp("hf_single") / "ds"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(r, features=features)
                          for s, r in parts.items()}).save_to_disk(str(folder))
    return folder


def test_hf_single_label_save_to_disk(single_label, tmp_path):
    out = tmp_path / "shards"
    args = ["hf", "--dataset", str(single_label), "--out", str(out), "--image-column", "img",
            "--text-column", "caption", "--label-column", "animal", "--sessions", "2",
            "--splits", "train=train,val=validation,test=test", "--image-size", "32",
            "--samples-per-shard", "4", "--quiet", "--workers", "0"]
    assert prepare_main(args) == 0
    m = read_manifest(out)
    assert m["dataset"] == f"hf:{single_label}" and not m["multilabel"]
    assert m["class_names"] == NAMES and [s["classes"] for s in m["sessions"]] == [[0, 1], [2, 3]]
    assert m["preparation"]["counts"] == [{"train": 10, "val": 2, "test": 4},
                                          {"train": 12, "val": 2, "test": 4}]
    assert m["preparation"]["dropped"] == {"empty or missing text": 1, "image file missing": 1}
    assert m["preparation"]["dropped_examples"]["image file missing"] == ["train/00000007"]
    assert any("ClassLabel" in r for r in m["source"]["rules"])
    assert set(m["source"]["inputs"]["dataset_fingerprints"]) == {"train", "validation", "test"}
    for k in range(2):
        for split in ("train", "val", "test"):
            got = tar_samples(out, k, split)
            assert len(got) == m["sessions"][k]["splits"][split]["count"]
            for s, source in zip(got, m["sessions"][k]["splits"][split]["sources"]):
                assert s["session"] == k == s["label"] // 2
                assert s["txt"].startswith(f"a {NAMES[s['label']]} number")
                assert s["pixel"].shape == (32, 32, 3)
                assert np.abs(s["pixel"].mean((0, 1)) - COLORS[s["label"]]).max() < 12
    assert prepare_main(args) == 0                           # same inputs: up to date
    assert read_manifest(out)["source"] == m["source"]


def test_hf_multilabel_split_column_and_class_lists(tmp_path):
    """One Dataset, a split column, labels as lists of names; sessions listed by name."""
    rows = {"image": [], "text": [], "genres": [], "part": []}
    combos = [["cat"], ["cat", "dog"], ["dog"], ["eel", "cat"], ["fox"], ["eel"], ["fox", "dog"], ["bat"]]
    for n in range(3):
        for combo in combos:
            rows["image"].append(image(len(combo)))
            rows["text"].append(["about", " ".join(combo)])     # list texts: joined with ". "
            rows["genres"].append(combo)
            rows["part"].append(["train", "test", "dev"][n])
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string")),
        "genres": datasets.Sequence(datasets.Value("string")), "part": datasets.Value("string")}),
    ).save_to_disk(str(folder))
    prepare("hf", folder, tmp_path / "out", image_size=16, progress=False, label_column="genres",
            split_column="part", sessions="cat,dog|eel,fox")
    m = read_manifest(tmp_path / "out")
    assert m["multilabel"] and m["class_names"] == ["cat", "dog", "eel", "fox"]
    assert m["preparation"]["dropped"] == {"no kept class": 3}          # ["bat"] in each split
    assert [c["train"] for c in m["preparation"]["counts"]] == [3, 4]
    labels = sorted(s["label"] for s in tar_samples(tmp_path / "out", 1, "test"))
    assert labels == [[0, 2], [1, 3], [2], [3]]                          # in its last class's session
    assert tar_samples(tmp_path / "out", 0, "val")[0]["txt"].startswith("about. ")


def test_hf_errors_name_the_dataset_and_the_column(single_label, tmp_path):
    with pytest.raises(SourceError, match=r"no column\(s\) \['label'\]"):
        prepare("hf", single_label, tmp_path / "o", progress=False, image_column="img",
                text_column="caption", splits="train=train,test=test")
    with pytest.raises(SourceError, match=r"no split 'dev' \(for val\)"):
        prepare("hf", single_label, tmp_path / "o", progress=False, image_column="img",
                text_column="caption", label_column="animal", splits="train=train,val=dev,test=test")
    with pytest.raises(SourceError, match=r"4 classes do not split into 3 equal sessions"):
        prepare("hf", single_label, tmp_path / "o", progress=False, image_column="img",
                text_column="caption", label_column="animal", splits="train=train,test=test",
                sessions="3")
    with pytest.raises(SourceError, match=r"cannot load it as a Hugging Face dataset"):
        prepare("hf", tmp_path / "nothing-here", tmp_path / "o", progress=False,
                splits="train=train,test=test")


@pytest.mark.slow  # the first trainer run in a process imports ~12 s of libraries
def test_hf_dataset_through_the_trainer(single_label, tmp_path):
    out = tmp_path / "shards"
    prepare("hf", single_label, out, image_size=32, progress=False, image_column="img",
            text_column="caption", label_column="animal", sessions="2",
            splits="train=train,val=validation,test=test")
    res = train_one_session(out, tmp_path / "run", "hf", **{"data.sessions": 2})
    assert res["metric"] == "accuracy" and len(res["accuracy_matrix"]) == 2
    assert res["chance"] == 0.25 and res["missing"]["s1_train"]["n"] == 12
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 1
