"""Several nodes, on one machine: two `accelerate launch` processes with
accelerate_configs/multi_node_zero2.yaml (machine rank 0 and 1, main address 127.0.0.1, one
gloo process each, what slurm/sweep.sbatch starts on each node), checked against the
2-process single-node run: the same global batches, so identical routing and AP within the
reduction-order tolerance of tests/test_distributed.py. bf16 is the config's GPU setting:
CPU runs pass --mixed_precision no, as the Slurm script's ACCELERATE_ARGS do."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, tiny_overrides
from tests.test_distributed import TOLERANCE, free_port, launch
from tests.helpers import job_env

pytestmark = pytest.mark.slow


def test_two_nodes_train_the_same_experiment_as_one_node(shards, tmp_path):
    common = {"data.sessions": 2, "train.epochs": 2, "train.batch_size": 8}
    launch(2, tiny_overrides(shards, tmp_path / "one_node", **common))

    out, port = tmp_path / "two_nodes", free_port()
    overrides = tiny_overrides(shards, out, **common)
    nodes = []
    for rank in (0, 1):
        cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/multi_node_zero2.yaml",
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", "delo_dist/train.py", "recipes/quickstart.yaml", *overrides]
        log = open(tmp_path / f"node{rank}.log", "w")
        nodes.append((subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in nodes:
        proc.wait(timeout=900)
        log.close()
    for rank, (proc, _) in enumerate(nodes):
        assert proc.returncode == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]

    a = json.loads((tmp_path / "one_node" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["world_size"] == 2
    assert a["routing_matrix"] == b["routing_matrix"]
    assert abs(a["ap"] - b["ap"]) <= TOLERANCE and abs(a["fg"] - b["fg"]) <= TOLERANCE
    assert [r["rank"] for r in b["sessions"][0]["per_rank"]] == [0, 1]
