"""`python -m delo_dist.ablations`: the spread rule, the table, the MAIL paper's ablations as
variants, presets and benchmarks on the command line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from delo_dist import ablations
from delo_dist.ablations import (ALIASES, MAIL_VARIANTS, PRESETS, VARIANTS, mean_std,
                                 overrides_for, resolve, table)
from delo_dist.data.missing import MissingSpec, missing_table
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream
from delo_dist.models.continual import ContinualModel
from delo_dist.methods.mail import MailSession
from delo_dist.training.engines import TorchEngine
from delo_dist.training.losses import supervised_loss
from tests.conftest import REPO, tiny_overrides


def test_mean_std_is_the_sample_std_over_the_values_present():
    mean, std, n = mean_std([0.2, 0.4, None])
    assert (mean, n) == (pytest.approx(0.3), 2)
    assert std == pytest.approx(math.sqrt(0.02))       # sample std (n - 1); population: 0.1
    assert mean_std([0.5]) == (0.5, None, 1) and mean_std([None]) == (None, None, 0)


def test_table_reports_mean_and_sample_std_and_availability():
    per_seed = [{"seed": s, "ap": ap, "fg": 0.0, "oracle_ap": 0.5, "oracle_fg": 0.0,
                 "routing_accuracy": 0.8, "wall_time_s": 10.0, "complete": 1.0, "text_only": None,
                 "image_only": 0.6} for s, ap in ((0, 0.2), (1, 0.4))]
    row = {"benchmark": "content", "variant": "task_id_analytic", "n": 2, "per_seed": per_seed}
    for k in ablations.METRICS + ablations.AVAILABILITY:
        row[k], row[f"{k}_std"], row[f"{k}_n"] = mean_std(p[k] for p in per_seed)
    lines = table([row]).splitlines()
    assert lines[2] == ("| content | task_id_analytic | 30.00 ± 14.14 (n=2) | 0.00 ± 0.00 (n=2) | "
                        "50.00 ± 0.00 (n=2) | 0.00 ± 0.00 (n=2) | 80.0 ± 0.0 (n=2) | 10 |")
    assert lines[-1] == ("| content | task_id_analytic | 80.0 ± 0.0 (n=2) | 100.0 ± 0.0 (n=2) | - | "
                         "60.0 ± 0.0 (n=2) |")


def test_mail_variants_are_the_papers_ablations_each_one_change_from_its_default():
    default = VARIANTS["mail"]
    assert default == {"method.name": "mail", "method.mail.variant": "both",
                       "method.mail.routing": "top_k", "method.mail.top_k": 2,
                       "method.mail.allocation": "square"}
    changes = {name: {k: v for k, v in o.items() if default[k] != v}
               for name, o in MAIL_VARIANTS.items() if name != "mail"}
    assert changes == {"mail_l": {"method.mail.variant": "linear"},
                       "mail_a": {"method.mail.variant": "attention"},
                       "mail_top1": {"method.mail.top_k": 1},
                       "mail_soft": {"method.mail.routing": "soft_merge"},
                       "mail_increasing": {"method.mail.allocation": "increasing"},
                       "mail_decreasing": {"method.mail.allocation": "decreasing"}}
    assert resolve(["mail_top2", "mail_b", "mail_square", "mail_top1"]) == ["mail", "mail_top1"]
    assert set(ALIASES.values()) == {"mail"} and PRESETS["mail"] == list(MAIL_VARIANTS)
    with pytest.raises(ValueError, match="unknown variants \\['mail_top3'\\]"):
        resolve(["mail_top3"])


@pytest.mark.parametrize("variant", list(MAIL_VARIANTS))
def test_each_mail_variant_builds_what_it_names_and_trains_a_step(recipe_for, shards, variant):
    recipe = recipe_for(**dict(o.split("=", 1) for o in overrides_for(variant, rank=2)))
    m = read_manifest(recipe.data.shards)
    torch.manual_seed(0)
    model = ContinualModel(recipe, [s["classes"] for s in m["sessions"]], m["num_classes"])
    sessions = [a.session_module(0) for a in model.adapted]
    assert all(isinstance(s, MailSession) for s in sessions)
    per_layer = {"mail_l": 2, "mail_a": 3}.get(variant, 5)       # tiny ViLT: 2 layers
    assert len(sessions) == 2 * per_layer
    experts = sorted({s.experts for s in sessions})
    assert experts == {"mail_increasing": [2, 8], "mail_decreasing": [2, 8]}.get(variant, [5])
    assert {s.top_k for s in sessions} == {{"mail_top1": 1, "mail_soft": None}.get(variant, 2)}
    params = model.set_trainable(0)
    engine = TorchEngine(model, params, recipe.train, total_steps=10)
    table_ = missing_table(m["sessions"][0]["splits"]["train"]["keys"], MissingSpec(0.5, "both", 0.5),
                           0, "train")
    batch = next(iter(SessionStream(shards, m, 0, "train", 8, model.backbone.collate, table_,
                                    train=False)))
    loss = supervised_loss(engine(batch, session=0)["logits"], batch, model.local_index[0], False)
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)


def test_command_line_errors_name_what_was_expected(capsys):
    cases = [(["r.yaml", "--only", "mail_top3"], "unknown variants ['mail_top3']"),
             (["r.yaml", "--only", "mail", "--preset", "mail"], "give one of them"),
             (["--benchmarks", "cue,food"], "unknown benchmarks ['food']"),
             (["--benchmarks", "cue", "recipes/quickstart.yaml"], "give no RECIPE"),
             ([], "give a RECIPE, or --benchmarks")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            ablations.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_mail_preset_on_two_benchmarks_end_to_end(shards, tmp_path, monkeypatch, capsys):
    """The command as BENCHMARKS.md runs it, on the tests' tiny shards (both names point at
    the quickstart recipe here): every MAIL variant, a folder and a table per benchmark,
    one printed table."""
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    monkeypatch.setattr(ablations, "BENCHMARKS", {"cue": recipe, "content": recipe})
    ablations.main(["--benchmarks", "cue,content", "--preset", "mail"] +
                   tiny_overrides(shards, tmp_path / "abl", **{"data.sessions": 2,
                                                                "backbone.tiny.num_hidden_layers": 2}))
    printed = capsys.readouterr().out
    for bench in ("cue", "content"):
        rows = json.loads((tmp_path / "abl" / "ablations" / bench / "results.json").read_text())
        assert [r["variant"] for r in rows] == list(MAIL_VARIANTS)
        for r in rows:
            m = json.loads((tmp_path / "abl" / "ablations" / bench / r["variant"] /
                            "metrics.json").read_text())
            assert m["method"] == "mail" and r["ap"] == m["ap"] and r["n"] == 1
            assert f"| {bench} | {r['variant']} | {100 * r['ap']:.2f} (n=1) |" in printed
