"""Preparation of the three raw layouts: tiny real raw folders (PIL JPEGs, JSON files) made
here, prepared into shards, read back from the tars and trained on through the trainer."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delo_dist.config import load_recipe
from delo_dist.data.prepare import main as prepare_main
from delo_dist.data.prepare import prepare
from delo_dist.data.shards import iter_tar_samples, read_manifest
from delo_dist.data.sources import SourceError
from delo_dist.data.stream import SessionStream, make_loader
from tests.conftest import REPO, tiny_overrides

COLORS = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (200, 90, 200)]


def jpeg(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)


def truncate(path: Path) -> None:
    """A JPEG cut in half, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def tar_samples(root: Path, session: int, split: str) -> list[dict]:
    m = read_manifest(root)
    urls = [str(root / s) for s in m["sessions"][session]["splits"][split]["shards"]]
    return [{"key": s["__key__"], "txt": s["txt"].decode(), **json.loads(s["json"]),
             "pixel": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))}
            for s in iter_tar_samples(urls)]


def train_one_session(shards: Path, out: Path, dataset: str, **extra) -> dict:
    from delo_dist.training.trainer import Trainer
    overrides = tiny_overrides(shards, out, **{
        "data.sessions": 1, "data.make_synthetic": "false", "data.dataset": dataset,
        "data.eta": 0.5, "data.missing_type": "both", "train.batch_size": 2, **extra})
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    assert Trainer(recipe).run() == 0
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- food101
FOOD = ["apple_pie", "bibimbap", "churros", "donuts", "edamame"]   # edamame: 5th, left out


def make_food101(root: Path) -> Path:
    """5 classes x (6 train, 1 val, 2 test); one truncated JPEG, one text absent, one empty."""
    texts, splits = {}, {"train": [], "val": [], "test": []}
    for c, cls in enumerate(FOOD):
        for n in range(9):
            split = "train" if n < 6 else "val" if n == 6 else "test"
            name = f"{cls}_{n}.jpg"
            jpeg(root / "images" / ("test" if split == "test" else "train") / cls / name, COLORS[c])
            splits[split].append(name)
            texts[name] = f"{cls.replace('_', ' ')} recipe {n}"
    truncate(root / "images/train/apple_pie/apple_pie_2.jpg")      # s0 train
    del texts["bibimbap_6.jpg"]                                      # s0 val
    texts["donuts_7.jpg"] = "  "                                     # s1 test
    write_json(root / "text.json", texts)
    write_json(root / "split.json", splits)
    write_json(root / "class_idx.json", {cls: i for i, cls in enumerate(FOOD)})
    return root


@pytest.fixture(scope="module")
def food_raw(tmp_path_factory) -> Path:
    return make_food101(tmp_path_factory.mktemp("food101_raw"))


@pytest.fixture(scope="module")
def food_shards(food_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("food101_shards")
    prepare("food101", food_raw, out, image_size=32, samples_per_shard=5, sessions=2,
            classes_per_session=2, progress=False)
    return out


def test_food101_counts_labels_and_dropped_items(food_shards, food_raw):
    m = read_manifest(food_shards)
    assert m["dataset"] == "food101" and not m["multilabel"] and m["num_classes"] == 4
    assert m["class_names"] == FOOD[:4] and [s["classes"] for s in m["sessions"]] == [[0, 1], [2, 3]]
    assert m["preparation"]["counts"] == [{"train": 11, "val": 1, "test": 4},
                                          {"train": 12, "val": 2, "test": 3}]
    assert m["preparation"]["dropped"] == {"class left out": 9, "empty or missing text": 2,
                                           "unreadable image": 1}
    assert m["preparation"]["dropped_examples"]["unreadable image"] == ["train/apple_pie_2.jpg"]
    assert any("edamame" in r for r in m["source"]["rules"])
    assert set(m["source"]["inputs"]["files"]) == {"class_idx.json", "text.json", "split.json"}
    texts = json.loads((food_raw / "text.json").read_text())
    for k, sess in enumerate(m["sessions"]):
        for split in ("train", "val", "test"):
            entry = sess["splits"][split]
            got = tar_samples(food_shards, k, split)
            assert [s["key"] for s in got] == entry["keys"] and len(got) == entry["count"]
            assert len(set(entry["keys"])) == entry["count"]
            for s, source in zip(got, entry["sources"]):
                name = source.split("/", 1)[1]
                cls = name.rsplit("_", 1)[0]
                assert s["label"] == FOOD.index(cls) and s["session"] == k
                assert s["label"] in sess["classes"] and s["txt"] == texts[name]
                assert s["pixel"].shape == (32, 32, 3)                  # resized at preparation
                assert np.abs(s["pixel"].mean((0, 1)) - COLORS[s["label"]]).max() < 12
    assert "s00-train-0000002" not in m["sessions"][0]["splits"]["train"]["keys"]  # the bad JPEG
    assert len(m["sessions"][1]["splits"]["train"]["shards"]) == 3                 # 12 at 5 a shard


@pytest.mark.slow  # the first trainer run in a process imports ~12 s of libraries
def test_food101_through_the_trainer(food_shards, tmp_path):
    res = train_one_session(food_shards, tmp_path / "run", "food101")
    assert res["metric"] == "accuracy" and len(res["accuracy_matrix"]) == 1
    acc = res["accuracy_matrix"][0][0]
    assert acc * 4 == pytest.approx(round(acc * 4)) and res["chance"] == 0.5   # 4 test samples
    train, test = res["missing"]["s0_train"], res["missing"]["s0_test"]
    # eta 0.5 both: 11 -> 5 incomplete (2 image-missing, 3 text-missing); 4 -> 2 (1, 1)
    assert train["n"] == 11 and train["complete"] == pytest.approx(6 / 11)
    assert train["image_missing"] == pytest.approx(2 / 11) and train["text_missing"] == pytest.approx(3 / 11)
    assert test["n"] == 4 and (test["complete"], test["image_missing"], test["text_missing"]) == (0.5, 0.25, 0.25)


def test_two_ranks_two_workers_read_each_sample_once(food_shards):
    """Session 1: 12 training samples in 3 shards = 2 global batches of 3 x 2 ranks."""
    m = read_manifest(food_shards)
    collate = lambda samples: [s["key"] for s in samples]  # noqa: E731
    for epoch in (0, 1):
        train = Counter()
        for rank in range(2):
            s = SessionStream(food_shards, m, 1, "train", 3, collate, {}, train=True,
                              rank=rank, world=2, epoch=epoch)
            batches = list(make_loader(s, num_workers=2))
            assert len(batches) == len(s) == 2
            train.update(k for b in batches for k in b)
        assert sorted(train) == sorted(m["sessions"][1]["splits"]["train"]["keys"])
        assert set(train.values()) == {1}
    test = Counter()
    for rank in range(2):
        s = SessionStream(food_shards, m, 1, "test", 2, collate, {}, train=False, rank=rank, world=2)
        test.update(k for b in make_loader(s, num_workers=2) for k in b)
    assert sorted(test) == sorted(m["sessions"][1]["splits"]["test"]["keys"]) and set(test.values()) == {1}


def test_rerun_is_up_to_date_then_rebuilds_cleanly(food_raw, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "shards"
    shutil.copytree(food_raw, raw)
    args = ["food101", "--root", str(raw), "--out", str(out), "--image-size", "32",
            "--sessions", "2", "--classes-per-session", "2", "--quiet", "--workers", "0"]
    assert prepare_main(args + ["--samples-per-shard", "5"]) == 0
    first = read_manifest(out)
    assert "wrote" in capsys.readouterr().out
    assert prepare_main(args + ["--samples-per-shard", "5"]) == 0
    text = capsys.readouterr().out
    assert "up to date" in text and "dropped 1 (unreadable image)" in text
    stale = out / "session_01" / "train-00002.tar"
    assert stale.is_file()
    (out / "session_00" / "train-00007.tar.tmp").write_bytes(b"half")   # a killed writer's leftover
    texts = json.loads((raw / "text.json").read_text())
    texts["bibimbap_6.jpg"] = "bibimbap again"                          # the input changed
    (raw / "text.json").write_text(json.dumps(texts))
    assert prepare_main(args + ["--samples-per-shard", "50", "--workers", "2"]) == 0
    assert "up to date" not in capsys.readouterr().out
    again = read_manifest(out)
    assert again["preparation"]["counts"][0]["val"] == 2 and not stale.exists()
    assert sorted(p.name for p in out.rglob("*.tar*")) == sorted(
        f"{s}-00000.tar" for s in ("train", "val", "test") for _ in range(2))
    # keys name the same source items whatever else changed (the index is given before drops)
    for k in range(2):
        old, new = first["sessions"][k]["splits"]["train"], again["sessions"][k]["splits"]["train"]
        assert dict(zip(old["keys"], old["sources"])) == dict(zip(new["keys"], new["sources"]))


def test_layout_errors_name_the_file_and_the_item(food_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(food_raw, raw)
    splits = json.loads((raw / "split.json").read_text())
    write_json(raw / "split.json", {**splits, "train": splits["train"] + ["zucchini_1.jpg"]})
    with pytest.raises(SourceError, match=r"split\.json: item 'zucchini_1\.jpg' of 'train': class 'zucchini'"):
        prepare("food101", raw, tmp_path / "out", sessions=2, classes_per_session=2, progress=False)
    write_json(raw / "split.json", {"train": splits["train"], "val": splits["val"]})
    with pytest.raises(SourceError, match=r"split\.json: no 'test' split"):
        prepare("food101", raw, tmp_path / "out", sessions=2, classes_per_session=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------- mmimdb
MOVIES = {  # id: (split, genres, plot)
    "0000001": ("train", ["Drama"], ["a quiet family drama"]),
    "0000002": ("train", ["Drama", "Comedy"], ["a funny drama"]),
    "0000003": ("train", ["Drama", "Action"], ["a drama with a chase"]),
    "0000004": ("train", ["Comedy"], ["jokes all along"]),
    "0000005": ("train", ["Action", "Horror"], ["a monster chase"]),
    "0000006": ("train", ["Drama", "Horror"], ["a sad ghost"]),
    "0000007": ("train", ["Comedy", "Action"], ["a funny heist"]),
    "0000008": ("train", ["Drama", "Western"], ["a cowboy drama"]),
    "0000009": ("train", ["News"], ["the evening news"]),            # no kept genre
    "0000010": ("train", ["Drama", "Comedy"], ["a broken poster"]),  # truncated JPEG
    "0000011": ("train", ["Horror"], ["", "the second plot", "a third"]),  # plots joined
    "0000012": ("train", ["Comedy"], []),                            # no text
    "0000013": ("train", ["Drama", "Comedy"], ["another funny drama"]),
    "0000014": ("train", ["Drama"], ["more drama"]),
    "0000021": ("dev", ["Drama"], ["a dev drama"]),
    "0000022": ("dev", ["Horror", "Drama"], ["a dev ghost"]),
    "0000031": ("test", ["Drama", "Comedy"], ["a test comedy drama"]),
    "0000032": ("test", ["Comedy"], ["test jokes"]),
    "0000033": ("test", ["Action"], ["a test chase"]),
    "0000034": ("test", ["Horror", "Comedy"], ["a funny ghost"]),
    "0000035": ("test", ["Drama"], ["a test drama"]),
}
GENRES = ["Drama", "Comedy", "Action", "Horror"]  # by training frequency 8, 6, 3, 3 (name breaks ties)


@pytest.fixture(scope="module")
def imdb_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mmimdb_raw")
    splits = {"train": [], "dev": [], "test": []}
    for mid, (split, genres, plot) in MOVIES.items():
        jpeg(root / "images" / f"{mid}.jpeg", COLORS[len(genres) + int(mid) % 3])
        write_json(root / "labels" / f"{mid}.json", {"plot": plot, "genres": genres, "title": mid})
        splits[split].append(mid)
    truncate(root / "images" / "0000010.jpeg")
    write_json(root / "split.json", splits)
    out = tmp_path_factory.mktemp("mmimdb_shards")
    prepare("mmimdb", root, out, image_size=32, samples_per_shard=4, sessions=2,
            classes_per_session=2, progress=False)
    return out


def test_mmimdb_genres_sessions_and_plots(imdb_shards):
    m = read_manifest(imdb_shards)
    assert m["multilabel"] and m["class_names"] == GENRES
    assert m["preparation"]["dropped"] == {"empty or missing text": 1, "no kept genre": 1,
                                           "unreadable image": 1}
    assert m["preparation"]["counts"] == [{"train": 6, "val": 1, "test": 3},
                                          {"train": 5, "val": 1, "test": 2}]
    assert any("['News', 'Western']" in r for r in m["source"]["rules"])
    for k, sess in enumerate(m["sessions"]):
        for split in ("train", "val", "test"):
            entry = sess["splits"][split]
            for s, mid in zip(tar_samples(imdb_shards, k, split), entry["sources"]):
                _, genres, plot = MOVIES[mid]
                assert s["label"] == sorted(GENRES.index(g) for g in genres if g in GENRES)
                assert max(s["label"]) // 2 == k == s["session"]          # rarest kept genre
                assert s["txt"] == ". ".join(p for p in plot if p)
    assert "0000011" in m["sessions"][1]["splits"]["train"]["sources"]
    assert any("joined with '. '" in r for r in m["source"]["rules"])


@pytest.mark.slow  # the first trainer run in a process imports ~12 s of libraries
def test_mmimdb_through_the_trainer_scores_macro_f1(imdb_shards, tmp_path):
    res = train_one_session(imdb_shards, tmp_path / "run", "mmimdb")
    assert res["metric"] == "macro_f1" and res["chance"] is None
    assert res["ap"] == res["accuracy_matrix"][0][0] == res["sessions"][0]["performance"][0]
    train, test = res["missing"]["s0_train"], res["missing"]["s0_test"]
    assert train["n"] == 6 and (train["complete"], train["image_missing"]) == (0.5, pytest.approx(1 / 6))
    assert test["n"] == 3 and (test["image_missing"], test["text_missing"]) == (0.0, pytest.approx(1 / 3))


# ----------------------------------------------------------------------------- cmml-json
def make_cmml(root: Path, label=lambda c: c, **changes) -> Path:
    """4 classes, 2 sessions (task_id = class // 2), 4 train / 1 val / 2 test per class."""
    rows = []
    for c in range(4):
        for n in range(7):
            split = "train" if n < 4 else "val" if n == 4 else "test"
            image = f"task{c // 2}/c{c}_{n}.jpg"
            jpeg(root / "images" / image, COLORS[c])
            text = f"class {c} item {n}" if n % 2 else ["", f"class {c} item {n}", "unused"]
            rows.append({"image": image, "text": text, "label": label(c), "split": split,
                         "task_id": c // 2})
    for i, change in changes.items():
        rows[int(i.strip("_"))].update(change)
    write_json(root / "food101.json", rows)
    return root


@pytest.fixture(scope="module")
def cmml_shards(tmp_path_factory) -> Path:
    root = make_cmml(tmp_path_factory.mktemp("cmml_raw"), _4={"text": ""})  # class 0 val: no text
    truncate(root / "images" / "task0" / "c1_2.jpg")                         # class 1 train
    out = tmp_path_factory.mktemp("cmml_shards")
    prepare("cmml-json", root, out, image_size=32, samples_per_shard=4, progress=False)
    return out


def test_cmml_json_keeps_the_files_split_and_sessions(cmml_shards):
    m = read_manifest(cmml_shards)
    rows = json.loads(Path(m["source"]["root"], "food101.json").read_text())
    assert m["dataset"] == "cmml-json:food101" and [s["classes"] for s in m["sessions"]] == [[0, 1], [2, 3]]
    assert m["preparation"]["counts"] == [{"train": 7, "val": 1, "test": 4},
                                          {"train": 8, "val": 2, "test": 4}]
    assert m["preparation"]["dropped"] == {"empty or missing text": 1, "unreadable image": 1}
    assert any("joined with '. '" in r for r in m["source"]["rules"])
    for k, sess in enumerate(m["sessions"]):
        for split in ("train", "val", "test"):
            entry = sess["splits"][split]
            for s, source in zip(tar_samples(cmml_shards, k, split), entry["sources"]):
                row = rows[int(source)]
                assert (row["split"], row["task_id"], row["label"]) == (split, k, s["label"])
                # the reference's rule: list texts joined with ". " (the empty entry skipped)
                assert s["txt"] == (row["text"] if isinstance(row["text"], str)
                                    else f"{row['text'][1]}. unused")


@pytest.mark.slow  # the first trainer run in a process imports ~12 s of libraries
def test_cmml_json_through_the_trainer(cmml_shards, tmp_path):
    res = train_one_session(cmml_shards, tmp_path / "run", "cmml-json", **{"data.eta": 0.0})
    assert res["metric"] == "accuracy" and res["missing"]["s0_train"]["n"] == 7
    assert res["missing"]["s0_train"]["complete"] == 1.0 and res["missing"]["s0_test"]["n"] == 4


def test_cmml_json_multi_hot_labels(tmp_path):
    root = make_cmml(tmp_path / "raw", label=lambda c: [int(j in (c, (c + 1) % 4)) for j in range(4)])
    out = tmp_path / "out"
    prepare("cmml-json", root, out, image_size=16, progress=False)
    m = read_manifest(out)
    assert m["multilabel"] and [s["classes"] for s in m["sessions"]] == [[0, 1], [2, 3]]
    assert sorted(s["label"] for s in tar_samples(out, 1, "test")) == [[0, 3]] * 2 + [[2, 3]] * 2


@pytest.mark.parametrize("changes, message", [
    ({"_3": {"label": 2}}, r"food101\.json: labels of session 1 \(2\.\.3\) overlap or precede session 0's \(0\.\.2\)"),
    ({"_3": {"split": "holdout"}}, r"food101\.json: item 3 \('task0/c0_3\.jpg'\): split 'holdout'"),
    ({"_3": {"image": "x.jpg", "split": None}}, r"item 3 \('x\.jpg'\): split None"),
    ({str(i): {"task_id": 2} for i in range(14, 28)}, r"session\(s\) \[1\] have no samples"),
])
def test_cmml_json_errors(tmp_path, changes, message):
    root = make_cmml(tmp_path / "raw", **changes)
    with pytest.raises(SourceError, match=message):
        prepare("cmml-json", root, tmp_path / "out", progress=False)


def test_cmml_json_label_outside_declared_classes(tmp_path):
    root = make_cmml(tmp_path / "raw", _20={"label": 7})
    with pytest.raises(SourceError, match=r"item 20 \('task1/c2_6\.jpg'\): label 7 is not one of "
                                          r"session 1's classes 2\.\.3"):
        prepare("cmml-json", root, tmp_path / "out", classes_per_session=2, progress=False)
