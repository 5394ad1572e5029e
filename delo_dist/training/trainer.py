"""The session loop: for each session in order, train only its parameters, then evaluate on
the test split of every session seen so far, log, and checkpoint.

Phases, top-down: `setup` (distributed state, data, model, tracker, resume), `run`
(sessions), `finish` (metrics.json, heatmap, artefacts). A SIGTERM or SIGUSR1 (what Slurm
sends before preemption or the time limit) makes every rank agree to stop after the
current step, write a checkpoint and exit with EXIT_PREEMPTED; relaunched with the same
output dir, the job resumes from it, in the same MLflow run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from delo_dist import metrics as M
from delo_dist.config import Recipe, to_dict
from delo_dist.data.missing import MissingSpec, missing_table, table_summary
from delo_dist.data.shards import read_manifest
from delo_dist.data.stream import SessionStream, make_loader
from delo_dist.models.continual import ContinualModel, parameter_summary
from delo_dist.plots import accuracy_heatmap
from delo_dist.tracking import Tracker
from delo_dist.training import checkpoint, dist
from delo_dist.training.engines import DeepSpeedEngine, TorchEngine
from delo_dist.training.objective import objective, update_task_key

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, relaunch to resume


class LaunchError(RuntimeError):
    """The launch (processes, devices) and the recipe disagree."""


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.stop_requested = False

    # ================================================================ setup
    def setup(self) -> None:
        r = self.recipe
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # first: a stop during setup is not lost
            signal.signal(sig, self._on_signal)
        from accelerate import Accelerator
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = dist.rank(), dist.world()
        self.main = self.rank == 0
        self.device = self.accelerator.device
        self.engine_kind = self._engine_kind()
        random.seed(r.seed)
        np.random.seed(r.seed)
        torch.manual_seed(r.seed)
        self.out = Path(r.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)

        self.manifest = self._data()
        self.multilabel = bool(self.manifest.get("multilabel"))
        sessions = self.manifest["sessions"]
        self.n_sessions = min(len(sessions), r.data.sessions or len(sessions))
        if r.eval.checkpoint:  # evaluate with the model the checkpoint was trained as
            state = json.loads((Path(r.eval.checkpoint) / "state.json").read_text())
            self.n_sessions = state["n_sessions"]
        self._check_launch()
        self.tables = self._missing_tables()

        torch.manual_seed(r.seed)  # the tiny random backbone is the same on every rank and resume
        self.model = ContinualModel(r, [s["classes"] for s in sessions[:self.n_sessions]],
                                    self.manifest["num_classes"], self.multilabel).to(self.device)
        evaluating = r.eval.checkpoint is not None  # evaluation only: no run, no resume
        self.tracker = Tracker(r, enabled=self.main and not evaluating)
        counts = parameter_summary(self.model)
        if self.main:
            print("parameters: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in counts.items()), flush=True)
        self.tracker.log_params({f"params.{k}": v for k, v in counts.items()})
        self.result = {"accuracy_matrix": [], "oracle_matrix": [], "routing_matrix": [],
                       "sessions": []}
        self.resume = None if evaluating else self._resume()

    def _engine_kind(self) -> str:
        kind = self.recipe.distributed.engine
        launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if kind == "auto":
            kind = "deepspeed" if (launched_ds or self.world > 1) else "torch"
        if kind == "torch" and self.world > 1:
            raise LaunchError(f"distributed.engine=torch runs one process, but {self.world} were "
                              "launched: use engine=deepspeed (zero_stage 0 is plain data parallel)")
        if kind == "deepspeed" and self.world == 1 and not torch.cuda.is_available():
            raise LaunchError("DeepSpeed ZeRO on CPU needs 2 or more processes (gloo); this launch "
                              "has 1 and no GPU: launch with accelerate_configs/cpu_2proc_zero2.yaml "
                              "or set distributed.engine=torch")
        return kind

    def _check_launch(self) -> None:
        if self.world == 1:
            return
        for k in range(self.n_sessions):
            count = self.manifest["sessions"][k]["splits"]["test"]["count"]
            if count < self.world:
                raise LaunchError(f"session {k} has {count} test samples for {self.world} ranks: "
                                  "each rank needs at least one")
            train = self.manifest["sessions"][k]["splits"]["train"]["count"]
            if train < self.recipe.train.batch_size * self.world:
                raise LaunchError(f"session {k} has {train} training samples, fewer than one global "
                                  f"batch ({self.recipe.train.batch_size} x {self.world} ranks)")

    def _data(self) -> dict:
        d = self.recipe.data
        root = Path(d.shards)
        if d.make_synthetic and not (root / "manifest.json").is_file():
            if self.main:
                from delo_dist.data.synthetic import make_synthetic
                s = d.synthetic
                make_synthetic(root, s.sessions, s.classes_per_session, s.train_per_class,
                               s.val_per_class, s.test_per_class, s.image_size,
                               s.samples_per_shard, s.seed, progress=True)
            dist.barrier()
        return read_manifest(root)

    def _missing_tables(self) -> dict:
        d = self.recipe.data
        spec = MissingSpec(d.eta, d.missing_type, d.both_ratio, d.missing_seed)
        tables, summary = {}, {}
        for k in range(self.n_sessions):
            for split in ("train", "test"):
                keys = self.manifest["sessions"][k]["splits"][split]["keys"]
                tables[(k, split)] = missing_table(keys, spec, k, split)
                summary[f"s{k}_{split}"] = table_summary(tables[(k, split)])
        self.missing_summary = summary
        return tables

    def _resume(self) -> dict | None:
        path = checkpoint.latest(self.out)
        if path is None:
            return None
        checkpoint.load_model(path, self.model)
        state = checkpoint.load_state(path)
        self.result = state["result"]
        if self.main:
            print(f"resuming from {path} (session {state['session']}, epoch {state['epoch']}, "
                  f"step {state['step_in_epoch']})", flush=True)
        state["path"] = str(path)
        return state

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    # ================================================================ run
    def run(self) -> int:
        start = time.time()
        try:
            self.setup()
            self.tracker.log_params({f"missing.{k}.{f}": v for k, s in self.missing_summary.items()
                                     for f, v in s.items() if f in ("hash", "complete")})
            if self.recipe.eval.checkpoint:
                self.evaluate_checkpoint(Path(self.recipe.eval.checkpoint))
                self.tracker.end("FINISHED")
                return 0
            first = self.resume["session"] if self.resume else 0
            for k in range(first, self.n_sessions):
                if len(self.result["accuracy_matrix"]) > k:
                    continue  # this session was trained and evaluated before the restart
                if not self.train_session(k):
                    self.tracker.end("KILLED")
                    return EXIT_PREEMPTED
                self.evaluate_session(k)
                self.save(tag=f"session_{k:02d}", session=k + 1, epoch=0, step=0, engine=None)
            self.finish(time.time() - start)
            self.tracker.end("FINISHED")
            return 0
        except BaseException:
            if getattr(self, "tracker", None) is not None:
                self.tracker.end("FAILED")
            raise

    def _stream(self, k: int, split: str, train: bool, epoch: int = 0, skip: int = 0):
        r = self.recipe
        stream = SessionStream(
            r.data.shards, self.manifest, k, split,
            r.train.batch_size if train else r.eval.batch_size, self.model.backbone.collate,
            self.tables.get((k, split), {}), train=train, rank=self.rank, world=self.world,
            seed=r.seed, epoch=epoch, shuffle_buffer=r.data.shuffle_buffer, skip_batches=skip)
        return stream, make_loader(stream, r.data.num_workers)

    def _build_engine(self, params: dict, total_steps: int):
        t = self.recipe.train
        if self.engine_kind == "torch":
            return TorchEngine(self.model, params, t, total_steps)
        stage = self.recipe.distributed.zero_stage  # the recipe wins, else the launch config
        if stage is None:
            stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))
        bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"
        return DeepSpeedEngine(self.model, params, t, total_steps, self.world, stage, bf16)

    def train_session(self, k: int) -> bool:
        """Train session k; False if a stop signal interrupted it (checkpoint written)."""
        t = self.recipe.train
        params = self.model.set_trainable(k)  # before the engine: it only sees these
        n_train = self.manifest["sessions"][k]["splits"]["train"]["count"]
        steps_per_epoch = n_train // (t.batch_size * self.world)
        engine = self._build_engine(params, steps_per_epoch * t.epochs)
        epoch0, step0 = 0, 0
        if self.resume and self.resume["session"] == k and self.resume.get("mid_session"):
            checkpoint.load_engine(Path(self.resume["path"]), engine)
            epoch0, step0 = self.resume["epoch"], self.resume["step_in_epoch"]
            self.session_losses = self.resume["session_losses"]
        else:
            self.session_losses = {"loss": 0.0, "ce": 0.0, "align": 0.0, "con": 0.0, "steps": 0}
        self.resume = None
        n_trainable = sum(p.numel() for p in params.values())
        t0 = time.time()
        for epoch in range(epoch0, t.epochs):
            _, loader = self._stream(k, "train", True, epoch, skip=step0 if epoch == epoch0 else 0)
            bar = tqdm(loader, desc=f"session {k} epoch {epoch + 1}/{t.epochs}",
                       disable=not self.main, leave=False)
            for i, batch in enumerate(bar, start=step0 if epoch == epoch0 else 0):
                parts = self.train_step(engine, to_device(batch, self.device), k, epoch)
                for name, v in parts.items():
                    self.session_losses[name] += v
                self.session_losses["steps"] += 1
                global_step = k * steps_per_epoch * t.epochs + epoch * steps_per_epoch + i + 1
                if self.main:
                    bar.set_postfix(loss=f"{parts['loss']:.3f}")
                    if global_step % t.log_every == 0:
                        self.tracker.log_metrics({"step/loss": parts["loss"], "step/lr": engine.lr()},
                                                 global_step)
                stop = self.stop_agreed  # reduced with the step's losses: every rank agrees
                due = t.checkpoint_every and global_step % t.checkpoint_every == 0
                if stop or due:
                    self.save(tag="latest_step", session=k, epoch=epoch, step=i + 1,
                              engine=engine, mid_session=True)
                if stop:
                    engine.destroy()
                    return False
            step0 = 0
        steps = max(self.session_losses["steps"], 1)
        self.session_info = {
            "session": k, "trainable_params": n_trainable,
            "optimizer_state_bytes": engine.optimizer_state_bytes(),
            "train_time_s": time.time() - t0, "engine": engine.name,
            "zero_stage": getattr(engine, "zero_stage", None),
            **{f"train_{n}": v / steps for n, v in self.session_losses.items() if n != "steps"},
        }
        engine.destroy()
        del engine
        self.session_info["rss_mb"] = rss_mb()
        if torch.cuda.is_available():
            self.session_info["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
        mine = {n: self.session_info.get(n) for n in
                ("trainable_params", "optimizer_state_bytes", "rss_mb", "peak_gpu_mb")}
        mine["task_keys_sha"] = _sha(self.model.task_keys.keys)   # equal on every rank
        self.session_info["per_rank"] = dist.all_gather_objects({"rank": self.rank, **mine})
        return True

    def train_step(self, engine, batch: dict, k: int, epoch: int) -> dict:
        self.model.train()
        loss, parts = objective(engine, self.model, batch, k, self.recipe.method, epoch,
                                self.multilabel)
        engine.backward(loss)
        engine.step()
        update_task_key(self.model, batch, k)
        # One reduction: global means of the loss parts (rank 0 alone would report its own
        # slice of the batch) and whether any rank was asked to stop.
        names = sorted(parts)
        packed = [parts[n] for n in names] + [1.0 if self.stop_requested else 0.0]
        sums = dist.all_reduce_sum(torch.tensor(packed, dtype=torch.float64)).tolist()
        self.stop_agreed = sums[-1] > 0
        return {n: v / self.world for n, v in zip(names, sums)}

    # ================================================================ evaluation
    def evaluate_checkpoint(self, path: Path) -> None:
        """Evaluate a checkpoint on every session it has seen; write eval.json (no training)."""
        checkpoint.load_model(path, self.model)
        seen = json.loads((path / "state.json").read_text())["session"]
        row, oracle_row, routing_row = self.evaluate(seen)
        if self.main:
            out = {"checkpoint": str(path), "seen": seen, "performance": row,
                   "oracle_performance": oracle_row, "routing_accuracy": routing_row,
                   "world_size": self.world}
            (self.out / "eval.json").write_text(json.dumps(out, indent=1))
            print(f"evaluated {path} on {seen} sessions: " +
                  " ".join(f"{100 * p:.2f}" for p in row), flush=True)

    @torch.no_grad()
    def evaluate(self, seen: int) -> tuple[list, list, list]:
        """Task-agnostic, oracle and routing accuracy on the test split of sessions < seen."""
        self.model.eval()
        oracle = self.recipe.eval.oracle
        row, oracle_row, routing_row = [], [], []
        for i in range(seen):
            _, loader = self._stream(i, "test", train=False)
            local = []
            for batch in tqdm(loader, desc=f"eval S{i} of {seen}", disable=not self.main, leave=False):
                batch = to_device(batch, self.device)
                out = self.model.predict(batch, seen, oracle)
                labels = batch["labels"]
                local += [(key, _plain(labels, j), _plain(out["pred"], j),
                           _plain(out.get("oracle_pred"), j), int(out["routed"][j]))
                          for j, key in enumerate(batch["keys"])]
            gathered = sorted((x for part in dist.all_gather_objects(local) for x in part))
            perf, oracle_perf, routing = self._score(gathered, i)
            row.append(perf)
            oracle_row.append(oracle_perf)
            routing_row.append(routing)
        return row, oracle_row, routing_row

    def evaluate_session(self, k: int) -> None:
        """After session k: evaluate sessions 0..k, extend the matrices, log."""
        row, oracle_row, routing_row = self.evaluate(k + 1)
        res = self.result
        res["accuracy_matrix"].append(row)
        res["oracle_matrix"].append(oracle_row)
        res["routing_matrix"].append(routing_row)
        info = {**self.session_info, "performance": row, "oracle_performance": oracle_row,
                "routing_accuracy": routing_row,
                "ap": M.average_performance(res["accuracy_matrix"]),
                "fg": M.forgetting(res["accuracy_matrix"]),
                "oracle_ap": M.average_performance(res["oracle_matrix"]),
                "oracle_fg": M.forgetting(res["oracle_matrix"]),
                "mean_routing_accuracy": float(np.mean(routing_row))}
        res["sessions"].append(info)
        self._log_session(k, info)

    def _score(self, rows: list, session: int) -> tuple[float, float, float]:
        """rows: (key, label, pred, oracle pred, routed) -> performance, oracle, routing."""
        if self.multilabel:
            n, classes = self.manifest["num_classes"], self.manifest["sessions"][session]["classes"]
            as_tensor = lambda col: M.multi_hot(col, n)                    # noqa: E731
            metric = lambda pred, y: M.macro_f1(pred, y, classes)         # noqa: E731
        else:
            as_tensor, metric = torch.tensor, M.accuracy
        column = lambda j: as_tensor([r[j] for r in rows])                # noqa: E731
        labels = column(1)
        oracle = metric(column(3), labels) if rows and rows[0][3] is not None else float("nan")
        return metric(column(2), labels), oracle, float(np.mean([r[4] == session for r in rows]))

    def _log_session(self, k: int, info: dict) -> None:
        scalars = {n: v for n, v in info.items() if isinstance(v, (int, float)) and n != "session"}
        for r in info.get("per_rank", []):
            scalars.update({f"rank{r['rank']}/{n}": v for n, v in r.items()
                            if isinstance(v, (int, float)) and n != "rank"})
        for i, (p, o, rt) in enumerate(zip(info["performance"], info["oracle_performance"],
                                           info["routing_accuracy"])):
            scalars.update({f"perf_s{i}": p, f"oracle_perf_s{i}": o, f"routing_acc_s{i}": rt})
        self.tracker.log_metrics(scalars, step=k)
        if self.main:
            cells = " ".join(f"{100 * p:5.1f}" for p in info["performance"])
            print(f"session {k}: perf [{cells}]  AP {100 * info['ap']:.2f}  FG {100 * info['fg']:.2f}"
                  f"  oracle AP {100 * info['oracle_ap']:.2f}  routing {100 * info['mean_routing_accuracy']:.1f}%"
                  f"  loss {info.get('train_loss', float('nan')):.3f}", flush=True)

    # ================================================================ checkpoints and outputs
    def save(self, tag: str, session: int, epoch: int, step: int, engine, mid_session=False) -> None:
        state = {"session": session, "epoch": epoch, "step_in_epoch": step, "mid_session": mid_session,
                 "n_sessions": self.n_sessions,
                 "result": self.result, "run_id": self.tracker.run_id,
                 "session_losses": getattr(self, "session_losses", None)}
        checkpoint.save(self.out, tag, self.model, engine, state,
                        include_backbone=not self.recipe.backbone.pretrained)

    def finish(self, wall: float) -> None:
        if not self.main:
            return
        res, r = self.result, self.recipe
        seen_classes = sum(len(s["classes"]) for s in self.manifest["sessions"][:self.n_sessions])
        metric = "macro_f1" if self.multilabel else "accuracy"
        summary = {
            "dataset": r.data.dataset, "method": r.method.name, "metric": metric,
            "eta": r.data.eta, "missing_type": r.data.missing_type, "both_ratio": r.data.both_ratio,
            **{n: res[n] for n in ("accuracy_matrix", "oracle_matrix", "routing_matrix")},
            "ap": M.average_performance(res["accuracy_matrix"]),
            "fg": M.forgetting(res["accuracy_matrix"]),
            "fg_diagonal_form": M.forgetting_diag(res["accuracy_matrix"]),
            "bwt": M.backward_transfer(res["accuracy_matrix"]),
            "oracle_ap": M.average_performance(res["oracle_matrix"]),
            "oracle_fg": M.forgetting(res["oracle_matrix"]),
            "routing_accuracy": float(np.mean(res["routing_matrix"][-1])),
            "chance": None if self.multilabel else 1.0 / seen_classes,
            "sessions": res["sessions"], "missing": self.missing_summary,
            "wall_time_s": wall, "world_size": self.world,
        }
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=1))
        (self.out / "recipe.resolved.yaml").write_text(_yaml(to_dict(r)))
        accuracy_heatmap(res["accuracy_matrix"], self.out / "accuracy_matrix.png",
                         f"{r.name}: {r.method.name}, task-agnostic {metric} "
                         f"(AP {100 * summary['ap']:.1f}, FG {100 * summary['fg']:.1f})", metric)
        self.tracker.log_metrics({"final_ap": summary["ap"], "final_fg": summary["fg"],
                                  "final_oracle_ap": summary["oracle_ap"],
                                  "final_routing_accuracy": summary["routing_accuracy"]},
                                 step=self.n_sessions - 1)
        for name in ("metrics.json", "recipe.resolved.yaml", "accuracy_matrix.png"):
            self.tracker.log_artifact(self.out / name)
        chance = "" if summary["chance"] is None else f", chance {100 * summary['chance']:.2f}"
        print(f"\nfinal: AP {100 * summary['ap']:.2f}  FG {100 * summary['fg']:.2f}  "
              f"(oracle AP {100 * summary['oracle_ap']:.2f}, "
              f"routing {100 * summary['routing_accuracy']:.1f}%{chance})  wall {wall:.0f}s\n"
              f"wrote {self.out / 'metrics.json'}", flush=True)


def _sha(t: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _plain(t, j):
    if t is None:
        return None
    v = t[j]
    if torch.is_tensor(v):
        return v.nonzero().squeeze(1).tolist() if v.dtype == torch.bool else int(v)
    return v


def _yaml(tree: dict) -> str:
    import yaml
    return yaml.safe_dump(tree, sort_keys=False)
