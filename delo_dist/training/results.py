"""What a run reports: the parameter lines at start, a line and MLflow metrics per session,
metrics.json and the final line. Values in, text and dicts out: the trainer decides when."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import psutil
import torch

from delo_dist import metrics as M
from delo_dist.data.files import atomic_write_text
from delo_dist.models.continual import parameter_summary
from delo_dist.training.evaluation import _availability_line, _availability_scalars


def mean_or_none(values: list) -> float | None:
    """The mean routing accuracy, or None where nothing routes (a shared head)."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def parameter_report(model, recipe, micro: int, accum: int, world: int) -> tuple[dict, list[str]]:
    """(MLflow params, lines to print): what each session trains (Table 5's count), the
    model's total, the batch plan and the task identifier's state."""
    counts, r = model.parameter_counts(), recipe
    per = [s["trainable"] for s in counts["sessions"]]
    summary = parameter_summary(model)   # adapted linears, trainable share
    ident = model.identifier             # None: the method routes by nothing
    params = {"params.backbone_frozen": counts["backbone_frozen"], "params.total": counts["total"],
              "params.adapted_linears": summary["adapted_linears"],
              "params.trainable_percent": summary["trainable_percent"],
              "params.task_id_state_bytes": ident.state_bytes() if ident else 0,
              **{f"params.trainable_s{k}": n for k, n in enumerate(per)}}
    s0 = counts["sessions"][0]
    differ = f" (by session: {per})" if len(set(per)) > 1 else ""
    parts = "prompts" if hasattr(model, "prompter") else "adapters"
    shape = model.method.describe()
    shape = f" ({shape})" if shape else ""
    lines = [
        f"parameters: {r.method.name} on {r.backbone.pretrained or r.backbone.name + '-tiny'}"
        f"{shape}: backbone {counts['backbone_frozen']:,} frozen; per session "
        f"{s0['trainable']:,} trainable ({parts} {s0['adapters']:,} + head {s0['head']:,}){differ}; "
        f"total {counts['total']:,} with {len(per)} sessions; {summary['adapted_linears']} adapted "
        f"linears, {summary['trainable_percent']:.3g} % of the backbone a session",
        f"batch: {micro} x {accum} accumulated x {world} devices = {micro * accum * world} a step",
        f"task identification ({r.task_id.source}): {ident.describe()}" if ident else
        "task identification: none (the method routes by nothing)"]
    return params, lines


def session_entry(k: int, engine, trainable: int, seconds: float, losses: dict,
                  fit_info: dict) -> dict:
    """Session k's training facts: parameters, optimizer state, time, mean loss parts."""
    steps = max(losses["steps"], 1)
    return {"session": k, "trainable_params": trainable,
            "optimizer_state_bytes": engine.optimizer_state_bytes(), "train_time_s": seconds,
            "engine": engine.name, "zero_stage": getattr(engine, "zero_stage", None),
            **{f"train_{n}": v / steps for n, v in losses.items()
               if n not in ("steps", "nonfinite_steps")},
            "nonfinite_steps": losses["nonfinite_steps"], **fit_info}


def memory_now() -> dict:
    """This process's resident memory and, on a GPU, the peak since the last call."""
    out = {"rss_mb": psutil.Process().memory_info().rss / 2 ** 20}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    return out


def bad_samples(out: Path, session: int | None = None) -> list[dict]:
    """Samples the streams skipped as undecodable (key, shard, why), from their reports."""
    found = []
    for path in sorted((Path(out) / "data_faults").glob("s*.json")):
        found += [b for b in json.loads(path.read_text())
                  if session is None or b["session"] == session]
    return found


def add_session(result: dict, info: dict, row, oracle_row, routing_row, by_availability) -> dict:
    """Session k's evaluation into the run's matrices; its entry of metrics.json's `sessions`."""
    for name, value in (("accuracy_matrix", row), ("oracle_matrix", oracle_row),
                        ("routing_matrix", routing_row), ("routing_by_availability", by_availability)):
        result.setdefault(name, []).append(value)
    info = {**info, "performance": row, "oracle_performance": oracle_row,
            "routing_accuracy": routing_row, "routing_by_availability": by_availability,
            "ap": M.average_performance(result["accuracy_matrix"]),
            "fg": M.forgetting(result["accuracy_matrix"]),
            "oracle_ap": M.average_performance(result["oracle_matrix"]),
            "oracle_fg": M.forgetting(result["oracle_matrix"]),
            "mean_routing_accuracy": mean_or_none(routing_row)}
    result["sessions"].append(info)
    return info


def session_scalars(info: dict) -> dict:
    """MLflow metrics of one session (step = its index)."""
    scalars = {n: v for n, v in info.items() if isinstance(v, (int, float)) and n != "session"}
    for r in info.get("per_rank", []):
        scalars.update({f"rank{r['rank']}/{n}": v for n, v in r.items()
                        if isinstance(v, (int, float)) and n != "rank"})
    for i, (p, o, rt) in enumerate(zip(info["performance"], info["oracle_performance"],
                                       info["routing_accuracy"])):
        scalars.update({f"perf_s{i}": p, f"oracle_perf_s{i}": o})
        if rt is not None:   # None: nothing routes (a shared head)
            scalars[f"routing_acc_s{i}"] = rt
    scalars.update(_availability_scalars(info["routing_by_availability"]))
    return scalars


def session_line(k: int, info: dict) -> str:
    cells = " ".join(f"{100 * p:5.1f}" for p in info["performance"])
    routing = ("routing -" if info["mean_routing_accuracy"] is None else
               f"routing {100 * info['mean_routing_accuracy']:.1f}% "
               f"({_availability_line(info['routing_by_availability'])})")
    return (f"session {k}: perf [{cells}]  AP {100 * info['ap']:.2f}  FG {100 * info['fg']:.2f}"
            f"  oracle AP {100 * info['oracle_ap']:.2f}  {routing}"
            f"  loss {info.get('train_loss', float('nan')):.3f}")


def summary(recipe, result: dict, manifest: dict, n_sessions: int, multilabel: bool,
            routes: bool, **run) -> dict:
    """metrics.json: the matrices, AP, FG (both forms), BWT, oracle and routing views, chance,
    the sessions' entries, and what describes the run (`run`: wall time, world size, ...)."""
    r, acc = recipe, result["accuracy_matrix"]
    seen_classes = sum(len(s["classes"]) for s in manifest["sessions"][:n_sessions])
    return {
        "dataset": r.data.dataset, "method": r.method.name,
        "metric": "macro_f1" if multilabel else "accuracy",
        "multilabel_classes": r.eval.multilabel_classes if multilabel else None,
        "eta": r.data.eta, "missing_type": r.data.missing_type, "both_ratio": r.data.both_ratio,
        **{n: result[n] for n in ("accuracy_matrix", "oracle_matrix", "routing_matrix")},
        "ap": M.average_performance(acc), "fg": M.forgetting(acc),
        "fg_diagonal_form": M.forgetting_diag(acc), "bwt": M.backward_transfer(acc),
        "oracle_ap": M.average_performance(result["oracle_matrix"]),
        "oracle_fg": M.forgetting(result["oracle_matrix"]),
        "routing_accuracy": mean_or_none(result["routing_matrix"][-1]),
        "routing_by_availability": result["routing_by_availability"][-1],
        "task_id_source": r.task_id.source if routes else None,
        "chance": None if multilabel else 1.0 / seen_classes,
        "sessions": result["sessions"],
        "nonfinite_steps": sum(s.get("nonfinite_steps", 0) for s in result["sessions"]),
        "nonfinite": r.train.nonfinite, **run}


def final_metrics(s: dict) -> dict:
    final = {"final_ap": s["ap"], "final_fg": s["fg"], "final_oracle_ap": s["oracle_ap"]}
    if s["routing_accuracy"] is not None:
        final["final_routing_accuracy"] = s["routing_accuracy"]
    return final


def final_line(s: dict, path: Path) -> str:
    chance = "" if s["chance"] is None else f", chance {100 * s['chance']:.2f}"
    resumed = f" over {s['resumes'] + 1} attempts" if s["resumes"] else ""
    skipped = f"  {s['nonfinite_steps']} non-finite steps skipped" if s["nonfinite_steps"] else ""
    routing = "" if s["routing_accuracy"] is None else f", routing {100 * s['routing_accuracy']:.1f}%"
    return (f"\nfinal: AP {100 * s['ap']:.2f}  FG {100 * s['fg']:.2f}  "
            f"(oracle AP {100 * s['oracle_ap']:.2f}{routing}{chance})  wall {s['wall_time_s']:.0f}s"
            f"{resumed}{skipped}\nwrote {path}")


def write_strict_json(path: Path, obj) -> None:
    """JSON every reader accepts (NaN and inf as null), written whole or not at all."""
    # disk full: no half file left; train.py says where and why
    atomic_write_text(path, json.dumps(_strict(obj), indent=1, allow_nan=False))


def _strict(obj):
    """The same tree with NaN and inf as None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj
