"""The session loop: for each session in order, train only its parameters, then evaluate on
the test split of every session seen so far, log, and checkpoint.

Phases, top-down: `setup` (distributed state, data, model, tracker, resume), `run`
(sessions), `finish` (metrics.json, heatmap, artefacts). A SIGTERM or SIGUSR1 (what Slurm
sends before preemption or the time limit) or SIGINT makes every rank agree to stop after
the current step, write a checkpoint, leave `<output_dir>/PREEMPTED` and exit with
EXIT_PREEMPTED; relaunched with the same output dir and recipe, the job resumes from it, in
the same MLflow run. Before any work the main rank takes the output folder's lock, checks
the run identity (run_identity.py), probes the tracking server and verifies the checkpoint it
will resume from (checkpoint.py); every rank stops if any of that fails.

A NaN or inf loss or gradient norm is caught at every optimizer step, agreed by all ranks,
and never applied: `train.nonfinite: stop` ends the job (TrainingDiverged: session, epoch,
step, value, the last good checkpoint and how to resume; MLflow run FAILED, no metrics.json),
`skip` drops the step and counts it (metrics.json, MLflow), up to `train.max_nonfinite_steps`
a session.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from delo_dist import dist
from delo_dist import metrics as M
from delo_dist.config import Recipe, RecipeError, batch_plan, to_dict
from delo_dist.data.missing import MissingSpec, session_tables
from delo_dist.data.shards import check_sizes, has_file_records, manifest_sha256, read_manifest
from delo_dist.data.stream import SessionStream, make_loader
from delo_dist.models.continual import ContinualModel
from delo_dist.models.inputs import concat_batches
from delo_dist.plots import accuracy_heatmap
from delo_dist.tracking import Tracker, TrackingUnreachable, probe, resolve_uri
from delo_dist.training import checkpoint, evaluation, results, run_identity, stopping
from delo_dist.training.engines import (LaunchError, autocast, build_engine, check_launch,
                                        engine_kind, resolve_precision)
from delo_dist.training.evaluation import to_device
from delo_dist.training.objective import objective, observe_task_id
from delo_dist.training.run_identity import RunIdentityError
from delo_dist.training.run_lock import RunLock, RunLockError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, relaunch to resume


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.stop_requested = False
        self.already_finished = False

    # ================================================================ setup
    def setup(self) -> None:
        r = self.recipe
        for sig in stopping.STOP_SIGNALS:  # first: a stop during setup is not lost
            signal.signal(sig, self._on_signal)
        from accelerate import Accelerator
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = dist.rank(), dist.world()
        self.main = self.rank == 0
        self.device = self.accelerator.device
        self.engine_kind = engine_kind(r, self.world)
        try:  # per-device micro-batch and accumulation: the same global batch on any world size
            self.micro, self.accum = batch_plan(r.train, self.world)
        except RecipeError as e:
            raise LaunchError(str(e)) from e
        self.global_batch = self.micro * self.accum * self.world
        self.precision = resolve_precision(r.train.mixed_precision, self.device, self.engine_kind)
        random.seed(r.seed), np.random.seed(r.seed), torch.manual_seed(r.seed)
        self.out = Path(r.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        evaluating = r.eval.checkpoint is not None  # evaluation only: no run, no resume
        self.lock = RunLock(self.out)
        finished, resume_from = self._agree(self._preflight, evaluating)

        self.manifest = self._data()
        self.manifest_sha = manifest_sha256(r.data.shards)
        check_sizes(r.data.shards, self.manifest)
        if not evaluating:
            self._agree(self._record_identity, finished)
            self.already_finished = finished
        if self.already_finished:
            return
        self.multilabel = bool(self.manifest.get("multilabel"))
        sessions = self.manifest["sessions"]
        self.n_sessions = min(len(sessions), r.data.sessions or len(sessions))
        if r.eval.checkpoint:  # evaluate with the model the checkpoint was trained as
            state = json.loads((Path(r.eval.checkpoint) / "state.json").read_text())
            self.n_sessions = state["n_sessions"]
        check_launch(self.manifest, self.n_sessions, self.world, self.micro, self.accum)
        d = r.data
        self.tables, self.missing_summary = session_tables(
            self.manifest, self.n_sessions, MissingSpec(d.eta, d.missing_type, d.both_ratio, d.missing_seed))

        torch.manual_seed(r.seed)  # the tiny random backbone is the same on every rank and resume
        self.model = ContinualModel(r, [s["classes"] for s in sessions[:self.n_sessions]],
                                    self.manifest["num_classes"], self.multilabel).to(self.device)
        self.tracker = Tracker(r, enabled=self.main and not evaluating,
                               manifest_sha256=self.manifest_sha)
        self.tracker.set_tags({"metric": M.metric_name(self.multilabel, r.eval.multilabel_classes)})
        params, lines = results.parameter_report(self.model, r, self.micro, self.accum, self.world)
        self.tracker.log_params(params)
        if self.main:
            print("\n".join(lines), flush=True)
        self.result = {"sessions": []}   # + the matrices, a row per evaluated session
        self.resume = None if evaluating else self._resume(resume_from)

    def _agree(self, step, *args):
        """Run a main-rank step; every rank raises if it failed (no rank left waiting), else
        every rank returns what it returned on the main rank."""
        error = result = None
        if self.main:
            try:
                result = step(*args)
            except (RunLockError, RunIdentityError, TrackingUnreachable, FileExistsError,
                    checkpoint.CheckpointError) as e:
                error = (type(e).__name__, str(e))
        gathered = dist.all_gather_objects((error, result))
        errors = [e for e, _ in gathered if e]
        if errors:   # the same kind of error on every rank (train.py words each kind)
            kind = {"CheckpointError": checkpoint.CheckpointError,
                    "TrackingUnreachable": TrackingUnreachable}.get(errors[0][0], LaunchError)
            raise kind(errors[0][1])
        return gathered[0][1]   # the main rank's word

    def _preflight(self, evaluating: bool) -> tuple[bool, Path | None]:
        """Main rank, before any work: the folder's lock, its recorded recipe, the tracker.
        -> (whether the folder holds a finished run, the checkpoint to resume from)."""
        note = self.lock.acquire()
        if note:
            print(note, flush=True)
        if evaluating:
            checkpoint.check_for_eval(Path(self.recipe.eval.checkpoint), "eval.checkpoint")
            return False, None
        neutral = run_identity.check_recipe(self.out, to_dict(self.recipe))
        if neutral:
            print("continuing this output folder's run; result-neutral keys differ "
                  "(allowed): " + "; ".join(neutral), flush=True)
        probe(resolve_uri(self.recipe))
        if (self.out / "metrics.json").is_file():   # a finished run resumes nothing
            return True, None
        return False, self._choose_checkpoint()

    def _choose_checkpoint(self) -> Path | None:
        """Main rank: the checkpoint to resume from, verified (checkpoint.choose_resume)."""
        t = self.recipe.train
        path, note = checkpoint.choose_resume(
            self.out, t.resume_from, t.damaged_checkpoint == "fall_back", "train.resume_from")
        if note:
            print(note, flush=True)
        return path

    def _record_identity(self, finished: bool) -> None:
        """Main rank, data in hand: same data as the folder's run? Then record the identity
        (not for a `finished` run: nothing to train, nothing to rewrite)."""
        run_identity.check_data(self.out, self.manifest_sha)
        if finished:
            return
        run_identity.record(self.out, to_dict(self.recipe), self.manifest_sha)
        if not has_file_records(self.manifest):
            print(f"{self.recipe.data.shards}/manifest.json records no tar sizes (written by an "
                  "older version): sizes could not be checked; re-prepare to get them", flush=True)

    def _data(self) -> dict:
        d = self.recipe.data
        root = Path(d.shards)
        if d.make_synthetic and not (root / "manifest.json").is_file():
            from delo_dist.data.synthetic import make_from_config
            self._agree(make_from_config, root, d.synthetic)
        return read_manifest(root)

    def _resume(self, path: Path | None) -> dict | None:
        # the main rank chose and verified it before any work (_preflight); every rank loads it
        if self.main:
            stopping.clear_marker(self.out)
        if path is None:
            return None
        path = Path(path)
        checkpoint.load_model(path, self.model)
        state = checkpoint.load_state(path)
        self.result = state["result"]
        self.wall_before = state.get("wall_time_s", 0.0)   # earlier attempts' time, to the checkpoint
        self.resumes = state.get("resumes", 0) + 1
        if self.main:
            print(f"resuming from {path} ({checkpoint.describe(path)}; resume "
                  f"{self.resumes})", flush=True)
        state["path"] = str(path)
        return state

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now, without the checkpoint
        self.stop_requested = True

    # ================================================================ run
    def run(self) -> int:
        start = self.started = time.time()
        self.wall_before, self.resumes = 0.0, 0   # from the checkpoint when resuming
        try:
            self.setup()
            if self.already_finished:
                if self.main:
                    print(f"{self.out} holds a finished run of this recipe "
                          f"({self.out / 'metrics.json'}): nothing to do", flush=True)
                return 0
            self.tracker.log_params({f"missing.{k}.{f}": v for k, s in self.missing_summary.items()
                                     for f, v in s.items() if f in ("hash", "complete")})
            if self.recipe.eval.checkpoint:
                self.evaluate_checkpoint(Path(self.recipe.eval.checkpoint))
                self.tracker.end("FINISHED")
                return 0
            first = self.resume["session"] if self.resume else 0
            for k in range(first, self.n_sessions):
                if len(self.result.get("accuracy_matrix", [])) > k:
                    continue  # this session was trained and evaluated before the restart
                if not self.train_session(k):
                    if self.main:
                        line = stopping.mark_preempted(self.out, self.out / "checkpoints" / "latest_step")
                        print(line, flush=True)
                        self.final_line = line
                    self.tracker.end("KILLED")
                    return EXIT_PREEMPTED
                self.evaluate_session(k)
                self.save(tag=f"session_{k:02d}", session=k + 1, epoch=0, step=0, engine=None)
                if self.main:
                    checkpoint.prune(self.out, self.recipe.train.keep_checkpoints)
                self.tracker.flush()   # records buffered while the server was unreachable
            self.finish(self.wall_before + time.time() - start)
            self.tracker.end("FINISHED")
            return 0
        except BaseException:
            if getattr(self, "tracker", None) is not None:
                self.tracker.end("FAILED")
            self.ended_cleanly = False
            raise
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.release()
            if getattr(self, "accelerator", None) is not None:
                # the process group goes before the interpreter (left to exit, gloo's threads
                # can SIGABRT a finished rank), after a barrier when every rank ended cleanly
                if getattr(self, "ended_cleanly", True):
                    dist.barrier()
                self.accelerator.end_training()

    def stream(self, k: int, split: str, train: bool, epoch: int = 0, skip: int = 0):
        """(dataset, loader) of session k's split on this rank (train: shuffled per epoch)."""
        r = self.recipe
        count = self.manifest["sessions"][k]["splits"][split]["count"]
        # the allowance follows the split, not the pass (the identifier's fit reads train data
        # in evaluation order): any bad test sample changes the metric, train ones may be few
        max_bad = r.data.max_bad_samples if split == "test" else int(r.data.max_bad_train_fraction * count)
        stream = SessionStream(
            r.data.shards, self.manifest, k, split,
            self.micro if train else r.eval.batch_size, self.model.backbone.collate,
            self.tables.get((k, split), {}), train=train, rank=self.rank, world=self.world,
            seed=r.seed, epoch=epoch, shuffle_buffer=r.data.shuffle_buffer, skip_batches=skip,
            max_bad=max_bad, faults_path=self.out / "data_faults" / f"s{k:02d}-{split}.json",
            accum=self.accum if train else 1)
        return stream, make_loader(stream, r.data.num_workers)

    def train_session(self, k: int) -> bool:
        """Train session k; False if a stop signal interrupted it (checkpoint written)."""
        t = self.recipe.train
        mid_session = bool(self.resume and self.resume["session"] == k and self.resume.get("mid_session"))
        if not mid_session:  # a mid-session checkpoint holds what this would initialise
            self.model.method.start_session(self.model, k)
        params = self.model.set_trainable(k)  # before the engine: it only sees these
        n_train = self.manifest["sessions"][k]["splits"]["train"]["count"]
        steps_per_epoch = n_train // self.global_batch  # optimizer steps
        engine = build_engine(self.engine_kind, self.model, params, self.recipe,
                              steps_per_epoch * t.epochs, self.world, self.micro, self.accum,
                              self.precision)
        epoch0, step0 = 0, 0
        if mid_session:
            checkpoint.load_engine(Path(self.resume["path"]), engine)
            epoch0, step0 = self.resume["epoch"], self.resume["step_in_epoch"]
            self.session_losses = self.resume["session_losses"]
        else:
            self.session_losses = {"steps": 0}   # + each loss part, summed over steps
        self.session_losses.setdefault("nonfinite_steps", 0)
        self.resume = None
        n_trainable = sum(p.numel() for p in params.values())
        t0 = time.time()
        for epoch in range(epoch0, t.epochs):
            _, loader = self.stream(k, "train", True, epoch, skip=step0 if epoch == epoch0 else 0)
            bar = tqdm(loader, desc=f"session {k} epoch {epoch + 1}/{t.epochs}",
                       disable=not (self.main and sys.stderr.isatty()), leave=False)
            micro = []  # this optimizer step's micro-batches (accum of them)
            for j, batch in enumerate(bar, start=(step0 if epoch == epoch0 else 0) * self.accum):
                micro.append(to_device(batch, self.device))
                parts = self.train_step(engine, micro, k, epoch)
                if len(micro) < self.accum:
                    continue
                micro, i = [], j // self.accum
                where = f"session {k} epoch {epoch + 1}/{t.epochs} step {i + 1}/{steps_per_epoch}"
                global_step = k * steps_per_epoch * t.epochs + epoch * steps_per_epoch + i + 1
                if self.nonfinite is not None:   # agreed by every rank; its update was dropped
                    self.session_losses["nonfinite_steps"] += 1
                    stopping.nonfinite_step(self.recipe.train, self.nonfinite, where,
                                            self.session_losses["nonfinite_steps"], self.out,
                                            engine, self.main)
                else:
                    for name, v in parts.items():
                        self.session_losses[name] = self.session_losses.get(name, 0.0) + v
                    self.session_losses["steps"] += 1
                # every log_every optimizer steps of the epoch, and its last: step 10/12, 12/12
                if self.main and self.nonfinite is None:
                    bar.set_postfix(loss=f"{parts['loss']:.3f}")
                    if (i + 1) % t.log_every == 0 or i + 1 == steps_per_epoch:
                        self.tracker.log_metrics({"step/loss": parts["loss"], "step/lr": engine.lr()},
                                                 global_step)
                        if bar.disable:  # a log file, not a terminal: one plain line, no frames
                            print(f"{where} loss {parts['loss']:.3f}", flush=True)
                stop = self.stop_agreed  # reduced with the step's losses: every rank agrees
                due = t.checkpoint_every and global_step % t.checkpoint_every == 0
                if stop or due:
                    self.save(tag="latest_step", session=k, epoch=epoch, step=i + 1,
                              engine=engine, mid_session=True)
                if stop:
                    engine.destroy()
                    return False
            step0 = 0
        fit_info = self.fit_task_identifier(k)
        self.session_info = results.session_entry(k, engine, n_trainable, time.time() - t0,
                                                  self.session_losses, fit_info)
        engine.destroy()
        del engine
        self.session_info.update(results.memory_now())
        mine = {n: self.session_info.get(n) for n in
                ("trainable_params", "optimizer_state_bytes", "rss_mb", "peak_gpu_mb")}
        if self.model.identifier is not None:
            mine["task_id_sha"] = self.model.identifier.state_sha()   # equal on every rank
        self.session_info["per_rank"] = dist.all_gather_objects({"rank": self.rank, **mine})
        return True

    @torch.no_grad()
    def fit_task_identifier(self, k: int) -> dict:
        """End of session k: sources fitted from whole-session statistics (class prototypes,
        analytic) read one adapter-free pass of the train and val splits; the EMA keys were
        updated at every step and skip this."""
        if self.model.identifier is None or not self.model.identifier.fits_per_session:
            return {}
        t0 = time.time()
        self.model.eval()
        def batches(split):
            has = self.manifest["sessions"][k]["splits"].get(split, {}).get("count", 0) > 0
            return (to_device(b, self.device) for b in self.stream(k, split, train=False)[1]) if has else ()
        info = self.model.identifier.fit(k, batches("train"), batches("val"),
                                        self.model.identification_features)
        return {"task_id_fit_s": time.time() - t0, **info}

    def train_step(self, engine, micro: list[dict], k: int, epoch: int) -> dict:
        """One micro-batch (the last of `micro`, this optimizer step's micro-batches so far).
        Returns the loss parts averaged over the step's micro-batches so far: at the step's
        last micro-batch over every rank too, and then sets `self.stop_agreed` and
        `self.nonfinite` (None, or what was not finite); before it, this rank's alone."""
        self.model.train()
        with autocast(self.precision, self.device):  # forward and loss; backward outside
            loss, parts = objective(engine, self.model, micro[-1], k, epoch, self.multilabel)
        engine.backward(loss)
        norm = engine.step()   # the gradient norm at the step's last micro-batch; never applied
        n = len(micro)
        if n == 1:
            self._step_sums = {}
        for name, v in parts.items():   # summed here, reduced once at the step's end
            self._step_sums[name] = self._step_sums.get(name, 0.0) + v
        if n < self.accum:
            self.nonfinite = None
            return {name: v / n for name, v in self._step_sums.items()}
        bad_norm = norm is not None and not math.isfinite(norm)   # if non-finite (engines.py)
        # One reduction a step: global means of the loss parts (rank 0 alone would report its
        # own slice of the batch), whether any rank was asked to stop (a stop asked during the
        # step is still set), whether any saw a non-finite gradient norm (a NaN loss on any
        # rank or micro-batch makes the summed loss NaN).
        names = sorted(self._step_sums)
        packed = [self._step_sums[nm] for nm in names] + [float(self.stop_requested), float(bad_norm)]
        sums = dist.all_reduce_sum(torch.tensor(packed, dtype=torch.float64)).tolist()
        self.stop_agreed = sums[-2] > 0
        step_parts = {nm: v / (self.world * n) for nm, v in zip(names, sums)}
        self.nonfinite = None
        if not math.isfinite(step_parts["loss"]):
            self.nonfinite = f"loss {step_parts['loss']}"
        elif sums[-1] > 0:
            self.nonfinite = f"gradient norm {norm} (loss {step_parts['loss']:.4g})"
        else:  # the EMA sees the optimizer step's whole global batch, of applied steps only
            observe_task_id(self.model, concat_batches(micro), k)
        return step_parts

    # ================================================================ evaluation
    def evaluate_checkpoint(self, path: Path) -> None:
        """Evaluate a checkpoint on every session it has seen; write eval.json (no training)."""
        evaluation.evaluate_checkpoint(
            path, self.model, self._test_loader, self._scoring(), device=self.device,
            precision=self.precision, oracle=self.recipe.eval.oracle,
            progress=self.main and sys.stderr.isatty(), out_dir=self.out if self.main else None)

    def evaluate(self, seen: int) -> evaluation.EvalRow:
        return evaluation.evaluate(self.model, self._test_loader, seen, self._scoring(),
                                   device=self.device, precision=self.precision,
                                   oracle=self.recipe.eval.oracle,
                                   progress=self.main and sys.stderr.isatty())

    def _test_loader(self, k: int):
        return self.stream(k, "test", train=False)[1]

    def _scoring(self) -> evaluation.Scoring:
        return evaluation.Scoring.of(self.manifest, self.recipe.eval.multilabel_classes)

    def evaluate_session(self, k: int) -> None:
        """After session k: evaluate sessions 0..k, extend the matrices, log."""
        row, oracle_row, routing_row, by_availability, _ = self.evaluate(k + 1)
        bad = results.bad_samples(self.out, session=k)
        info = results.add_session(self.result, {**self.session_info, "bad_samples": len(bad)},
                                   row, oracle_row, routing_row, by_availability)
        self.tracker.log_metrics(results.session_scalars(info), step=k)
        if self.main:
            if bad:
                print(f"session {k}: skipped {len(bad)} undecodable sample(s): " + "; ".join(
                    f"{b['split']} {b['key']} in {b['shard']} ({b['error']})" for b in bad[:5]),
                    flush=True)
            print(results.session_line(k, info), flush=True)

    # ================================================================ checkpoints and outputs
    def save(self, tag: str, session: int, epoch: int, step: int, engine, mid_session=False) -> None:
        state = {"session": session, "epoch": epoch, "step_in_epoch": step, "mid_session": mid_session,
                 "n_sessions": self.n_sessions,
                 "result": self.result, "run_id": self.tracker.run_id,
                 "session_losses": getattr(self, "session_losses", None),
                 # time spent on the work this checkpoint holds, over every attempt so far
                 "wall_time_s": self.wall_before + time.time() - self.started,
                 "resumes": self.resumes}
        checkpoint.save(self.out, tag, self.model, engine, state,
                        include_backbone=not self.recipe.backbone.pretrained)

    def finish(self, wall: float) -> None:
        if not self.main:
            return
        r = self.recipe
        summary = results.summary(
            r, self.result, self.manifest, self.n_sessions, self.multilabel,
            routes=self.model.identifier is not None, missing=self.missing_summary,
            bad_samples=results.bad_samples(self.out), manifest_sha256=self.manifest_sha,
            # every attempt's time up to the checkpoint the next one resumed from, plus the last
            wall_time_s=wall, resumes=self.resumes, world_size=self.world,
            mixed_precision=self.precision)
        results.write_strict_json(self.out / "metrics.json", summary)
        accuracy_heatmap(self.result["accuracy_matrix"], self.out / "accuracy_matrix.png",
                         f"{r.name}: {r.method.name}, task-agnostic {summary['metric']} "
                         f"(AP {100 * summary['ap']:.1f}, FG {100 * summary['fg']:.1f})",
                         summary["metric"])
        self.tracker.log_metrics(results.final_metrics(summary), step=self.n_sessions - 1)
        for name in ("metrics.json", "recipe.resolved.yaml", "run.json", "accuracy_matrix.png"):
            self.tracker.log_artifact(self.out / name)
        stopping.clear_marker(self.out)
        print(results.final_line(summary, self.out / "metrics.json"), flush=True)
