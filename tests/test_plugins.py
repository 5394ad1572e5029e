"""A plug-in is one file: a method that lives only under tests/ (tests/plugins/bitfit.py),
registered from its own file through the recipe key `plugins`, and a method installed as a
separate package, found through its entry point. No other file names either."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from delo_dist import plugins
from delo_dist.config import RecipeError, load_recipe, to_dict
from delo_dist.models.continual import ContinualModel
from delo_dist.training.trainer import EXIT_PREEMPTED
from tests.conftest import REPO, tiny_overrides
from tests.helpers import job_env

BITFIT = "tests/plugins/bitfit.py"


def test_a_file_registers_a_method_with_its_own_section(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)   # the recipe names the file relative to where the job runs
    over = tiny_overrides(shards, tmp_path / "run", **{"plugins": f"[{BITFIT}]",
                                                       "method.name": "bitfit",
                                                       "method.bitfit.init_std": 0.5})
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", over)
    assert "bitfit" in plugins.names("method")
    assert recipe.method.settings.init_std == 0.5
    assert to_dict(recipe)["method"] == {"name": "bitfit", "bitfit": {"init_std": 0.5}}
    model = ContinualModel(recipe, [[0, 1], [2, 3]], 4)
    per = model.parameter_counts()["sessions"]
    hidden = recipe.backbone.tiny["hidden_size"]
    # a bias per adapted linear (q, k, v of each of the 2 layers) + the head, per session
    assert per[0]["adapters"] == 6 * hidden and per[1] == per[0]
    # its own checks, naming its key; a file that does not exist, naming the key
    with pytest.raises(RecipeError, match=r"'method.bitfit.init_std' expected a float >= 0"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", over + ["method.bitfit.init_std=-1"])
    with pytest.raises(RecipeError, match="key 'plugins' names 'tests/plugins/nope.py'"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", over + ["plugins=[tests/plugins/nope.py]"])


@pytest.mark.slow  # trains: a sweep of two methods, a killed run and its resume
def test_a_one_file_method_trains_resumes_and_appears_in_sweep_and_compare(shards, tmp_path):
    extra = {"plugins": f"[{BITFIT}]", "data.sessions": 2, "train.epochs": 3,
             "tracking.experiment": "plugin"}
    root = tmp_path / "sweep"
    sweep = [sys.executable, "-m", "delo_dist.sweep", "recipes/quickstart.yaml",
             *[o for o in tiny_overrides(shards, tmp_path / "unused", **extra)
               if not o.startswith("output_dir=")],
             "method.name=bitfit,head_only", f"output_root={root}"]
    done = subprocess.run(sweep, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 trained" in done.stdout
    straight = json.loads((root / "bitfit" / "metrics.json").read_text())
    assert straight["method"] == "bitfit" and len(straight["accuracy_matrix"]) == 2
    assert straight["ap"] > straight["chance"]      # it learned something: above chance
    uri = next(line.split("--tracking-uri ")[1].split()[0] for line in done.stdout.splitlines()
               if line.startswith("table: "))
    table = subprocess.run([sys.executable, "-m", "delo_dist.compare", "--tracking-uri", uri,
                            "--tag", "sweep=quickstart", "--out", str(tmp_path / "compare"),
                            "--no-log"], cwd=REPO, env=job_env(), capture_output=True, text=True,
                           timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    md = (tmp_path / "compare" / "compare.md").read_text()
    assert "| bitfit AP ↑ | bitfit FG ↓ | bitfit routing |" in md   # the plug-in's own column
    methods = {r["method.name"] for r in csv.DictReader(open(tmp_path / "compare" / "compare.csv"))}
    assert methods == {"bitfit", "head_only"}

    # killed in session 1, relaunched: the same result as the sweep's uninterrupted run
    out = tmp_path / "killed"
    train = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
             *tiny_overrides(shards, out, **extra), "method.name=bitfit"]
    proc = subprocess.Popen(train, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker, deadline = out / "checkpoints" / "session_00" / "state.json", time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before session 1"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED
    again = subprocess.run(train, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_matrix", "oracle_matrix", "routing_matrix", "ap", "fg"):
        assert resumed[key] == straight[key], key


PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "delo-demo-adapter"
        version = "0.1"
        [project.entry-points."delo_dist.methods"]
        demo_adapter = "delo_demo_adapter:DemoAdapter"
        [tool.setuptools]
        py-modules = ["delo_demo_adapter"]
    """,
    "delo_demo_adapter.py": """
        '''A plain per-session bottleneck adapter, shipped in its own package.'''
        from dataclasses import dataclass
        import torch
        from torch import nn
        from delo_dist.models.method import Method

        @dataclass
        class DemoSettings:
            width: int = 4

        class Bottleneck(nn.Module):
            uses_queries = False
            def __init__(self, d_in, d_out, width):
                super().__init__()
                self.down = nn.Linear(d_in, width, bias=False)
                self.up = nn.Linear(width, d_out, bias=False)
                nn.init.zeros_(self.up.weight)
            def delta(self, x, q_v=None, q_t=None, q_all=None, naive=False):
                return self.up(torch.relu(self.down(x)))

        class DemoAdapter(Method):
            name = "demo_adapter"
            Settings = DemoSettings
            def make_session(self, d_in, d_out, **_):
                return Bottleneck(d_in, d_out, self.cfg.width)
    """,
}


@pytest.mark.slow  # builds and installs a package (pip), then trains one session in a process
def test_an_installed_package_is_found_through_its_entry_point(shards, tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name, text in PACKAGE.items():
        (src / name).write_text(textwrap.dedent(text).lstrip())
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert any(p.name.endswith(".dist-info") for p in site.iterdir())
    out = tmp_path / "run"
    train = [sys.executable, "delo_dist/train.py", "recipes/quickstart.yaml",
             *tiny_overrides(shards, out, **{"data.sessions": 1}), "method.name=demo_adapter",
             "method.demo_adapter.width=3"]
    done = subprocess.run(train, cwd=REPO, env=job_env(PYTHONPATH=str(site)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters: demo_adapter" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "demo_adapter" and len(metrics["accuracy_matrix"]) == 1
    # without the package on the path the name is unknown, and the error lists what is known
    bad = subprocess.run(train, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown name 'demo_adapter'" in bad.stderr
