"""Using a trained model: `delo_dist.load`, `python -m delo_dist.predict`, `python -m
delo_dist.export`. A real tiny run (3 sessions of the synthetic benchmark) is trained once;
prediction in a fresh process must reproduce its evaluation sample by sample, from the
training checkpoint and from the exported folder."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from delo_dist.config import load_recipe
from delo_dist.export import export, folder_bytes
from delo_dist.inference import CheckpointError
from delo_dist.predict import main as predict_main
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A finished 3-session run, its per-sample evaluation rows (the trainer's own path) and
    an export of its last checkpoint."""
    from delo_dist.training.evaluation import Scoring, evaluate
    from delo_dist.training.trainer import Trainer
    root = tmp_path_factory.mktemp("predict")
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", tiny_overrides(shards, root / "run"))
    trainer = Trainer(recipe)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        assert trainer.run() == 0
    finally:   # the run exports its store's URI; the autouse guard is per test, this is not
        _restore_tracking_uri(before)
    ref = evaluate(trainer.model, lambda i: trainer.stream(i, "test", train=False)[1], 3,
                   Scoring.of(trainer.manifest, "seen"), device=trainer.device,
                   precision=trainer.precision, oracle=False, keep_samples=True)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert ref.performance == metrics["accuracy_matrix"][-1]   # re-evaluation is exact
    ckpt = root / "run" / "checkpoints" / "session_02"
    exp = root / "export"
    export(ckpt, exp)
    return {"root": root, "ckpt": ckpt, "export": exp, "ref": ref, "metrics": metrics,
            "shards": shards}


def _restore_tracking_uri(before: str | None) -> None:
    import mlflow
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_tracking_uri(None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _fresh_predict(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "delo_dist.predict", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # one tiny 3-session run for the module, two predicting processes
def test_predict_over_test_shards_reproduces_the_evaluation(trained, tmp_path):
    ref, metrics = trained["ref"], trained["metrics"]
    outputs = {}
    for name in ("ckpt", "export"):
        out, summary = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
        _fresh_predict([trained[name], "--shards", trained["shards"], "--out", out,
                        "--summary", summary], cwd=tmp_path)
        s = json.loads(summary.read_text())
        assert s["shards"]["performance"] == metrics["accuracy_matrix"][-1]
        assert s["shards"]["routing_accuracy"] == metrics["routing_matrix"][-1]
        assert s["samples"] == 96 and s["errors"] == 0
        lines = _lines(out)
        for k, rows in enumerate(ref.samples):    # (key, label, pred, oracle, routed, avail)
            mine = sorted((r for r in lines if r["true_session"] == k), key=lambda r: r["key"])
            assert [r["key"] for r in mine] == [row[0] for row in rows]
            assert [r["session"] for r in mine] == [row[4] for row in rows]     # same routing
            assert [r["class_ids"] for r in mine] == [[row[2]] for row in rows]  # same answers
            assert [r["label_ids"] for r in mine] == [[row[1]] for row in rows]
            assert [("complete", "text_only", "image_only").index(r["availability"])
                    for r in mine] == [row[5] for row in rows]
        # the identifier's scores pick the routed session; probabilities are probabilities
        assert all(max(range(3), key=r["session_scores"].__getitem__) == r["session"] for r in lines)
        assert all(0 < r["scores"][0] <= 1 and 0 <= r["session_confidence"] <= 1 for r in lines)
        outputs[name] = lines
    assert outputs["ckpt"] == outputs["export"]
    assert s["by_availability"] == {"complete": 30, "text_only": 33, "image_only": 33}  # eta 0.7


@pytest.mark.slow
def test_export_holds_less_than_the_checkpoint_and_says_what_it_left_out(trained):
    exp, ckpt = trained["export"], trained["ckpt"]
    assert folder_bytes(exp) < folder_bytes(ckpt)
    assert (exp / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat().st_size
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["format"] == "delo-dist-inference/1" and cfg["seen"] == 3
    assert cfg["class_names"][0] == "dark-disc-spicy-soup" and len(cfg["session_classes"]) == 3
    assert cfg["backbone"]["name"] == "vilt" and cfg["backbone"]["tiny"]["hidden_size"] == 32
    # routing reads only the solved weights: the Gram matrices stay behind
    assert {"identifier.gram", "identifier.val_gram"} <= set(cfg["dropped_tensors"])
    assert not set(os.listdir(exp)) & {"state.json", "rng-rank0.safetensors"}
    with pytest.raises(FileExistsError):
        export(ckpt, exp)


@pytest.mark.slow
def test_single_pairs_with_a_modality_missing_get_a_class(trained):
    import delo_dist
    model = delo_dist.load(trained["export"])
    image = _test_jpeg(trained["shards"], session=1)
    res = model.predict(images=[None, image, Image.open(io.BytesIO(image))],
                        texts=["sour pasta", None, None])
    assert [r["availability"] for r in res] == ["text_only", "image_only", "image_only"]
    for r in res:
        assert r["classes"][0] in model.class_names and len(r["class_ids"]) == 1
        assert model.class_names[r["class_ids"][0]] == r["classes"][0]
        assert r["session"] in range(3) and not r["truncated"]
    # a PIL image (sent losslessly) predicts as its encoded file does
    assert res[1]["scores"] == res[2]["scores"] and res[1]["session"] == res[2]["session"]
    # oracle mode: the given session's head answers, with one of its classes
    oracle = model.predict(texts=["sour pasta"], mode="oracle", session=2)[0]
    assert oracle["session"] == 2 and oracle["session_confidence"] is None
    assert oracle["class_ids"][0] in json.loads((trained["export"] / "config.json").read_text())[
        "session_classes"][2]
    with pytest.raises(ValueError, match="0 <= k < 3"):
        model.predict(texts=["x"], mode="oracle", session=3)


@pytest.mark.slow
def test_bad_samples_get_error_entries_and_the_rest_goes_on(trained, tmp_path):
    import delo_dist
    model = delo_dist.load(trained["ckpt"])
    good = _test_jpeg(trained["shards"], session=0)
    cut = tmp_path / "cut.jpg"                     # a valid header, 60 % of the data: the
    buf = io.BytesIO()                             # header parses, the decode fails
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, format="JPEG")
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 5])
    (tmp_path / "notes.jpg").write_text("not an image")
    long_text = " ".join(["spicy soup"] * 40)      # far over the trained 12 tokens
    res = model.predict(images=[cut, good, tmp_path / "absent.jpg", None, tmp_path / "notes.jpg", good],
                        texts=["spicy soup", "spicy soup", "x", None, "y", long_text])
    assert "cannot be decoded" in res[0]["error"]
    assert "No such file" in res[2]["error"] and "both modalities missing" in res[3]["error"]
    assert "cannot be read" in res[4]["error"]
    assert res[5]["truncated"] and not res[1]["truncated"]
    alone = model.predict(images=[good], texts=["spicy soup"])[0]
    # the errors around it change nothing (floats: up to the batch's summation order)
    assert {k: res[1][k] for k in ("session", "class_ids", "availability")} == {
        k: alone[k] for k in ("session", "class_ids", "availability")}
    assert res[1]["scores"] == pytest.approx(alone["scores"], rel=1e-5)

    # the same through the command line: a JSONL with a bad line, then its summary
    lines = [{"image": "cut.jpg", "text": "spicy soup"}, {"image": "", "text": long_text},
             {"text": "sweet cake"}, {}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out, summary = tmp_path / "out.csv", tmp_path / "summary.json"
    assert predict_main([str(trained["ckpt"]), "--input", str(src), "--out", str(out),
                         "--summary", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert s["samples"] == 5 and s["errors"] == 3 and s["truncated_texts"] == 1
    assert s["by_availability"] == {"complete": 0, "text_only": 2, "image_only": 0}
    rows = out.read_text().splitlines()
    assert rows[0].startswith("index,id,image,text") and len(rows) == 6
    assert "cut.jpg" in rows[1] and "cannot be decoded" in rows[1]


@pytest.mark.slow
def test_a_folder_of_images_with_same_name_texts(trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_test_jpeg(trained["shards"], session=2))
    (folder / "a.txt").write_text("sour pasta")
    (folder / "b.jpg").write_bytes(_test_jpeg(trained["shards"], session=0))
    out = tmp_path / "out.jsonl"
    assert predict_main([str(trained["export"]), "--folder", str(folder), "--out", str(out)]) == 0
    rows = _lines(out)
    assert [Path(r["image"]).name for r in rows] == ["a.jpg", "b.jpg"]
    assert [r["availability"] for r in rows] == ["complete", "image_only"]


@pytest.mark.slow
def test_incompatible_checkpoints_stop_with_one_line(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    # a checkpoint whose tensors another version named differently
    run = tmp_path / "old_run"
    shutil.copytree(trained["ckpt"], run / "checkpoints" / "session_02")
    for name in ("recipe.resolved.yaml", "run.json"):
        shutil.copy(trained["ckpt"].parent.parent / name, run / name)
    weights = run / "checkpoints" / "session_02" / "model.safetensors"
    tensors = load_file(str(weights))
    head = next(n for n in tensors if n.startswith("heads.0."))
    tensors["classifier." + head] = tensors.pop(head)
    save_file(tensors, str(weights))
    # an export of a future format
    future = tmp_path / "future"
    shutil.copytree(trained["export"], future)
    cfg = json.loads((future / "config.json").read_text())
    (future / "config.json").write_text(json.dumps({**cfg, "format": "delo-dist-inference/9"}))
    old = run / "checkpoints" / "session_02"
    for folder, expected in ((old, "incompatible version"), (future, "delo-dist-inference/1")):
        assert predict_main([str(folder), "--text", "spicy soup"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err and err.startswith("error: ")
    with pytest.raises(CheckpointError, match=r"tensors this version's model does not have: classifier\.heads"):
        __import__("delo_dist").load(old)


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_folder_that_is_not_a_checkpoint_stops_with_what_was_expected(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert predict_main([str(tmp_path), "--text", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0 and err.startswith("error: ")
    assert "not a checkpoint; expected a training checkpoint folder holding state.json" in err
    assert predict_main([str(tmp_path / "absent"), "--text", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow  # a 2-session multi-label run (cmml-json layout, multi-hot labels)
def test_multilabel_output_lists_every_class_above_threshold(tmp_path):
    import delo_dist
    from delo_dist.data.prepare import prepare
    from tests.test_prepare import make_cmml, train_one_session
    raw = make_cmml(tmp_path / "raw", label=lambda c: [int(j in (c, (c + 1) % 4)) for j in range(4)])
    shards = tmp_path / "shards"
    prepare("cmml-json", raw, shards, image_size=32, progress=False)
    metrics = train_one_session(shards, tmp_path / "run", "cmml-json", **{
        "data.sessions": 2, "train.epochs": 3, "train.lr": 0.01})
    ckpt = tmp_path / "run" / "checkpoints" / "session_01"
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    assert predict_main([str(ckpt), "--shards", str(shards), "--out", str(out),
                         "--summary", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert s["shards"]["metric"] == "macro_f1/seen"
    assert s["shards"]["performance"] == metrics["accuracy_matrix"][-1]
    rows = _lines(out)
    model = delo_dist.load(ckpt)
    session_classes = model.info.session_classes
    assert any(len(r["class_ids"]) >= 2 for r in rows)       # several classes at once
    for r in rows:
        assert all(p > 0.5 for p in r["scores"]) and len(r["scores"]) == len(r["class_ids"])
        assert set(r["class_ids"]) <= set(session_classes[r["session"]])   # the routed head's
        assert isinstance(r["label_ids"], list)
    # straight from Python: a class list per sample, possibly several classes
    res = model.predict(images=[_test_jpeg(shards, session=1)], texts=["class 2 item 1"])[0]
    assert isinstance(res["classes"], list) and all(c in model.class_names for c in res["classes"])


def _test_jpeg(shards: Path, session: int) -> bytes:
    """The first test image of a session, as encoded in its shard."""
    from delo_dist.data.shards import iter_tar_samples, read_manifest
    m = read_manifest(shards)
    url = str(shards / m["sessions"][session]["splits"]["test"]["shards"][0])
    return next(s["jpg"] for s in iter_tar_samples([url]) if "jpg" in s)


def test_identifier_confidence_of_the_ridge_is_its_clipped_normalised_output():
    """Unit: the analytic source's scores are its ridge outputs, argmax = its route."""
    from delo_dist.inference import identifier_scores
    from delo_dist.models.task_id import AnalyticRouter
    router = AnalyticRouter([[0], [1], [2]], 3, dim=2, pooled_dim=2)   # no layer features
    torch.manual_seed(0)
    router.weights.copy_(torch.randn_like(router.weights))
    feats = {n: torch.randn(5, 2) for n in ("q_v", "q_t", "pooled")}
    flags = {"missing_image": torch.tensor([0, 1, 0, 0, 1]).bool(),
             "missing_text": torch.tensor([0, 0, 1, 0, 0]).bool()}
    scores, conf = identifier_scores(router, feats, flags, seen=3)
    assert torch.equal(scores.argmax(1), router.route(feats, flags, 3))
    clipped = scores.clamp(min=0)
    total = clipped.sum(1, keepdim=True)
    expected = torch.where(total > 0, clipped / total.clamp(min=1e-12), torch.full_like(scores, 1 / 3))
    assert torch.allclose(conf, expected) and torch.allclose(conf.sum(1), torch.ones(5, dtype=conf.dtype))
