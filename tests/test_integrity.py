"""Data integrity with real, damaged tars: a cut tar, a manifest with wrong counts, a garbage
JPEG member (written with webdataset's TarWriter), a foreign folder given to the synthetic
generator. Each failure stops the job naming the shard, split and counts (or key), or is
skipped and reported where the recipe allows it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from delo_dist.config import load_recipe
from delo_dist.data.shards import DataIntegrityError, file_sha256, iter_tar_samples, read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.data.synthetic import make_synthetic
from delo_dist.data.verify import main as verify_main
from delo_dist.training.trainer import LaunchError, Trainer
from tests.conftest import REPO, TINY, tiny_overrides


def copy(shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    return root, json.loads((root / "manifest.json").read_text())


def save(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def recipe(root: Path, out: Path, **extra):
    return load_recipe(REPO / "recipes" / "quickstart.yaml",
                       tiny_overrides(root, out, **{"data.sessions": 1, **extra}))


def garbage_jpeg(root: Path, manifest: dict, split: str) -> tuple[str, str]:
    """Rewrite session 0's first `split` tar with one sample's JPEG replaced by junk bytes;
    the manifest records the new tar (as if it had been written that way). -> (key, shard)."""
    entry = manifest["sessions"][0]["splits"][split]
    shard = entry["shards"][0]
    samples = list(iter_tar_samples([str(root / shard)]))
    victim = samples[3]["__key__"]
    tmp = root / (shard + ".new")
    with wds.TarWriter(str(tmp)) as w:
        for s in samples:
            w.write({"__key__": s["__key__"], "json": s["json"], "txt": s["txt"],
                     "jpg": b"this is not a jpeg" * 10 if s["__key__"] == victim else s["jpg"]})
    tmp.replace(root / shard)
    entry["files"][shard].update(bytes=(root / shard).stat().st_size, sha256=file_sha256(root / shard))
    save(root, manifest)
    return victim, shard


@pytest.mark.slow  # trains or launches a process: not in the fast loop
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_cut_tar_stops_the_job_before_training(shards, tmp_path, split):
    root, m = copy(shards, tmp_path)
    shard = m["sessions"][0]["splits"][split]["shards"][0]
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(DataIntegrityError, match=f"{shard}: {len(data) // 2} bytes, the manifest says {len(data)}"):
        Trainer(recipe(root, tmp_path / "run")).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_cut_tar_under_an_old_manifest_is_caught_by_the_count(shards, tmp_path, capsys):
    """Manifests written before sizes were recorded: the stream's count still stops the job."""
    root, m = copy(shards, tmp_path)
    for sess in m["sessions"]:
        for entry in sess["splits"].values():
            del entry["files"]
    save(root, m)
    shard = m["sessions"][0]["splits"]["train"]["shards"][1]
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(DataIntegrityError, match=r"session 0 train of .*: \d+ samples read, the manifest says 64"):
        Trainer(recipe(root, tmp_path / "run")).run()
    assert "sizes could not be checked" in capsys.readouterr().out


def test_a_manifest_with_wrong_counts_stops_the_stream(shards, tmp_path):
    root, m = copy(shards, tmp_path)
    entry = m["sessions"][0]["splits"]["test"]
    entry["count"] += 1
    entry["keys"].append("s00-test-9999999")   # consistent with itself, not with the tars
    first = entry["shards"][0]
    entry["files"][first]["count"] += 1
    save(root, m)
    s = SessionStream(root, read_manifest(root), 0, "test", 8, lambda b: b, {}, train=False)
    with pytest.raises(DataIntegrityError) as e:
        list(s)
    assert "32 samples read, the manifest says 33" in str(e.value)
    assert f"{first}: 24 read, manifest 25" in str(e.value) and "session 0 test" in str(e.value)


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_garbage_jpeg_in_a_test_split_is_an_error_naming_key_and_shard(shards, tmp_path):
    root, m = copy(shards, tmp_path)
    key, shard = garbage_jpeg(root, m, "test")
    with pytest.raises(DataIntegrityError) as e:
        Trainer(recipe(root, tmp_path / "run")).run()
    assert key in str(e.value) and shard in str(e.value) and "session 0 test" in str(e.value)
    assert "UnidentifiedImageError" in str(e.value) and "data.max_bad_samples" in str(e.value)


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_a_garbage_jpeg_in_a_train_split_is_skipped_and_reported(shards, tmp_path, capsys):
    root, m = copy(shards, tmp_path)
    key, shard = garbage_jpeg(root, m, "train")
    r = recipe(root, tmp_path / "run", **{"data.max_bad_train_fraction": 0.02})  # 1 of 64
    assert Trainer(r).run() == 0
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(b["key"], b["shard"], b["split"]) for b in res["bad_samples"]] == [(key, shard, "train")]
    assert res["sessions"][0]["bad_samples"] == 1
    assert f"train {key} in {shard}" in capsys.readouterr().out
    import mlflow
    run = mlflow.MlflowClient(r.tracking.uri).search_runs(
        [mlflow.MlflowClient(r.tracking.uri).get_experiment_by_name(r.tracking.experiment).experiment_id])[0]
    assert run.data.metrics["bad_samples"] == 1


def test_a_test_split_may_be_allowed_bad_samples(shards, tmp_path):
    root, m = copy(shards, tmp_path)
    key, _ = garbage_jpeg(root, m, "test")
    s = SessionStream(root, read_manifest(root), 0, "test", 8, lambda b: [x["key"] for x in b], {},
                      train=False, max_bad=1)
    keys = [k for b in s for k in b]
    assert len(keys) == 31 and key not in keys and [b["key"] for b in s.bad] == [key]


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_verify_hashes_every_tar(shards, tmp_path, capsys):
    root, m = copy(shards, tmp_path)
    assert verify_main([str(root)]) == 0
    shard = m["sessions"][1]["splits"]["val"]["shards"][0]
    data = bytearray((root / shard).read_bytes())
    data[700] ^= 0xFF                                    # same size, other bytes
    (root / shard).write_bytes(bytes(data))
    assert verify_main([str(root)]) == 1
    assert f"MISMATCH {shard} (session 1 val): sha256 differs" in capsys.readouterr().err


@pytest.mark.slow  # trains or launches a process: not in the fast loop
def test_synthetic_data_never_overwrites_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "train-00000.tar").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=str(foreign)):
        make_synthetic(foreign, progress=False, **TINY)
    assert (foreign / "train-00000.tar").read_bytes() == b"precious"
    done = subprocess.run([sys.executable, "-m", "delo_dist.data.synthetic", "--out", str(foreign)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and str(foreign) in done.stderr
    r = load_recipe(REPO / "recipes" / "quickstart.yaml",
                    tiny_overrides(foreign, tmp_path / "run", **{"data.make_synthetic": "true"}))
    with pytest.raises(LaunchError, match=str(foreign)):
        Trainer(r).run()
    assert (foreign / "train-00000.tar").read_bytes() == b"precious"


def test_synthetic_data_is_reused_with_the_same_settings_only(tmp_path):
    out = make_synthetic(tmp_path / "syn", progress=False, **{**TINY, "sessions": 1})
    stamp = (out / "manifest.json").stat().st_mtime_ns
    make_synthetic(out, progress=False, **{**TINY, "sessions": 1})   # same settings: untouched
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        make_synthetic(out, progress=False, **{**TINY, "sessions": 1, "seed": 1})
