"""`python -m delo_dist.bench`: build the rows of the backbone and of every method, time them
round-robin, print the table, write the JSON (see delo_dist/bench/__init__.py)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from delo_dist import plugins
from delo_dist.bench.harness import Harness, Timer, meets, paired_rates, ratios, rss_mb, target_value
from delo_dist.bench.rows import RowBuilder, Setup, frozen_forwards
from delo_dist.config import RecipeError, load_recipe


def parse_args(argv=None) -> argparse.Namespace:
    from delo_dist import bench
    p = argparse.ArgumentParser(prog="python -m delo_dist.bench",
                                description=bench.__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--backbone", default=None, help="a backbone plug-in (default: the recipe's)")
    a("--clip", dest="backbone", action="store_const", const="clip", help="= --backbone clip")
    a("--methods", default=None,
      help="comma-separated method plug-ins (default: every registered one whose bench entry "
           "is not None and whose needs the backbone meets)")
    a("--reference", default=None, help="the method the others are compared with (default: "
                                        "the recipe's)")
    a("--variants", action=argparse.BooleanOptionalAction, default=True,
      help="also the plug-ins' variant models (naive paths, session counts, references, ...)")
    a("--hidden", type=int, default=256)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--intermediate", type=int, default=None, help="default: 4 x hidden")
    a("--patch", type=int, default=32)
    a("--image-size", type=int, default=384)
    a("--text-len", type=int, default=40)
    a("--batch", type=int, default=8)
    a("--sessions", type=int, default=4)
    a("--full", action="store_true", help="the backbone's paper shape (its bench entry's `full`)")
    a("--full-vilt", action="store_true", help=argparse.SUPPRESS)   # = --backbone vilt --full
    a("--full-clip", action="store_true", help=argparse.SUPPRESS)   # = --backbone clip --full
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="a recipe override for every model, e.g. task_id.source=first_layer (repeatable)")
    a("--repeats", type=int, default=5, help="timed rounds")
    a("--warmup", type=int, default=2, help="untimed calls per row first (at least 1)")
    a("--device", default="cpu")
    a("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a("--clock", choices=["wall", "process"], default="wall",
      help="process: this process's CPU time (steadier on a shared CPU machine; CPU only)")
    a("--loader-samples", type=int, default=64, help="JPEGs for the loader rows (0: none)")
    a("--loader-batch", type=int, default=4)
    a("--predict-batch", type=int, default=64, help="batch of the prediction rows (0: none)")
    a("--predict-method", default=None, help="the method of the prediction rows (default: "
                                             "--reference)")
    a("--seed", type=int, default=0)
    a("--json", default=None, help="write the JSON here ('-': stdout, the table then to stderr)")
    args = p.parse_args(argv)
    if args.full_vilt or args.full_clip:
        args.backbone, args.full = ("clip" if args.full_clip else "vilt"), True
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def chosen_methods(backbone: str, names: str | None, overrides: list[str]) -> tuple[list, dict]:
    """The methods to time, and those left out with the reason. Named ones must build."""
    if names is not None:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for name in chosen:  # an unknown name or a missing capability: one line, exit 2
            load_recipe(None, ["data.make_synthetic=true", f"backbone.name={backbone}",
                               f"method.name={name}", *overrides])
        return chosen, {}
    chosen, skipped = [], {}
    backbone_cls = plugins.get("backbone", backbone)
    for name in plugins.names("method"):
        cls = plugins.get("method", name)
        lacking = list(plugins.missing_capabilities(cls, backbone_cls))
        if plugins.bench_entry(cls) is None:
            skipped[name] = "bench entry None"
        elif lacking:
            skipped[name] = f"needs {', '.join(lacking)}"
        else:
            chosen.append(name)
    return chosen, skipped


def run(args) -> dict:
    defaults = load_recipe(None, ["data.make_synthetic=true"])
    backbone = args.backbone or defaults.backbone.name
    reference = args.reference or defaults.method.name
    bb_entry = plugins.bench_entry(plugins.get("backbone", backbone)) or plugins.BenchEntry()
    shape = {"backbone.tiny.hidden_size": args.hidden,
             "backbone.tiny.num_hidden_layers": args.layers,
             "backbone.tiny.num_attention_heads": args.heads,
             "backbone.tiny.intermediate_size": args.intermediate or 4 * args.hidden,
             "backbone.tiny.patch_size": args.patch, "backbone.image_size": args.image_size,
             "backbone.max_text_len": args.text_len, **(bb_entry.full if args.full else {})}
    setup = Setup(backbone, shape, list(args.overrides), args.batch, args.sessions, args.device,
                  args.seed)
    methods, skipped = chosen_methods(backbone, args.methods, args.overrides)
    methods.sort(key=lambda m: m != reference)   # the reference first, then registry order
    precision = "bf16" if args.dtype == "bf16" else "no"
    harness = Harness(Timer(args.device, precision, args.clock), args.warmup)
    builder = RowBuilder(setup, harness)
    rss0, specs, loader = rss_mb(), dict(bb_entry.ratios), None
    with tempfile.TemporaryDirectory(prefix="delo-dist-bench-") as folder:
        tmp = Path(folder)   # the loader's shards and the prediction rows' export
        say(f"bench: backbone {backbone} ({', '.join(f'{k}={v}' for k, v in shape.items())})")
        frozen = builder.backbone(backbone, bb_entry, args.variants)
        if args.loader_samples > 0:
            from delo_dist.bench.loader import loader_rows
            start = builder.start()
            rows, loader = loader_rows(backbone, frozen, bb_entry.loader_reference,
                                       args.loader_samples, args.loader_batch, tmp / "loader",
                                       args.seed)
            harness.add(rows, *start)
        for name in methods:
            say(f"bench: building {name}")
            entry = plugins.bench_entry(plugins.get("method", name)) or plugins.BenchEntry()
            builder.method(name, plugins.get("method", name), entry, args.variants)
            specs.update(entry.ratios)
        predict_method = args.predict_method or reference
        if args.predict_batch > 0:
            from delo_dist.bench.predict import prediction_rows
            say(f"bench: prediction rows ({predict_method}, batch {args.predict_batch})")
            entry = (plugins.bench_entry(plugins.get("method", predict_method))
                     or plugins.BenchEntry())
            start = builder.start()
            harness.add(prediction_rows(setup, predict_method, entry, args.predict_batch,
                                        tmp / "export", precision, builder.work), *start)
        say(f"bench: {len(harness.rows)} rows, {args.repeats} rounds")
        harness.run(args.repeats, lambda r: say(f"bench: round {r}/{args.repeats}"))
    rows = harness.results()
    frozen_forwards(rows, f"frozen/{backbone}")
    cf = builder.complete_fraction
    ratio_values, ratio_skipped = ratios(specs, rows, backbone)
    return {
        "meta": meta(args, backbone, setup, methods, skipped, reference, cf, rss0),
        "rows": rows, "ratios": ratio_values, "ratios_skipped": ratio_skipped,
        "targets": {n: target_value(s[2], cf) for n, s in specs.items() if s[2] is not None},
        "comparison": comparison(rows, methods, reference),
        "prediction": prediction(rows, predict_method) if args.predict_batch > 0 else None,
        "loader": loader,
    }


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def comparison(rows: dict, methods: list, reference: str) -> dict:
    """Each method's training step and task-agnostic inference against the reference's."""
    out = {}
    for m in methods:
        out[m] = {}
        for kind in ("train", "agnostic"):
            r, ref = rows.get(f"{kind}/{m}"), rows.get(f"{kind}/{reference}")
            if r is None:
                continue
            out[m][kind] = {"median_ms": r["median_ms"], "min_ms": r["min_ms"],
                            "frozen_forwards": r.get("frozen_forwards")}
            if "trainable_params" in r:
                out[m]["trainable_params"] = r["trainable_params"]
            if ref is not None:
                out[m][kind]["over_reference"] = {"median": r["median_ms"] / ref["median_ms"],
                                                  "min": r["min_ms"] / ref["min_ms"]}
    return {"reference": reference, "methods": out}


def prediction(rows: dict, method: str) -> dict:
    p, e = rows[f"predict/{method}"], rows[f"evaluate/{method}"]
    paired = paired_rates(p, e)
    return {"method": method, "batch": p["samples"], "predict_samples_per_s": paired["a"],
            "evaluate_samples_per_s": paired["b"], "difference_samples_per_s": paired["difference"],
            "predict_over_evaluate": paired["ratio_of_means"], "within_noise": paired["within_noise"],
            "same_predictions": e.get("same_predictions")}


def meta(args, backbone, setup, methods, skipped, reference, cf, rss0) -> dict:
    import peft
    import transformers
    cuda = str(args.device).startswith("cuda")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or
                    platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "device": str(args.device), "dtype": args.dtype, "clock": args.clock,
        "device_name": (torch.cuda.get_device_name() if cuda
                        else f"cpu ({torch.get_num_threads()} threads)"),
        "backbone": backbone, "shape": setup.shape, "overrides": setup.user,
        "batch": setup.batch, "sessions": setup.sessions, "complete_fraction": cf,
        "task_id": setup.recipe({}).task_id.source, "methods": methods,
        "methods_left_out": skipped, "reference": reference, "variants": args.variants,
        "warmup": max(args.warmup, 1), "repeats": args.repeats, "seed": args.seed,
        "rss_start_mb": rss0,
        "note": ("timings from a shared machine: other processes add noise; rows run "
                 "round-robin; ratios of medians and of minima"),
    }


# ------------------------------------------------------------------ the table

def table(result: dict) -> str:
    m = result["meta"]
    shape = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in m["shape"].items())
    load = m["machine"]["load_avg"]
    lines = [f"# {m['device_name']}, {m['dtype']}, torch {m['versions']['torch']}, {m['date']}"
             + (f", load {load[0]:.1f}" if load else "") + f" -- {m['note']}",
             f"# {m['backbone']}: {shape}; batch {m['batch']}, {m['sessions']} sessions, complete "
             f"fraction {m['complete_fraction']:.2f}, task_id {m['task_id']}"
             + (f", --set {' '.join(m['overrides'])}" if m["overrides"] else "")
             + f"; {m['warmup']} warm-up, {m['repeats']} rounds",
             f"{'row':<36}{'median ms':>11}{'min ms':>10}{'fwd eq':>8}{'mem MB':>8}"]
    for name, r in result["rows"].items():
        mem = r.get("peak_mem_mb", r.get("rss_delta_mb", math.nan))
        fwd = r.get("frozen_forwards")
        lines.append(f"{name:<36}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}"
                     f"{(f'{fwd:.2f}' if fwd is not None else ''):>8}{mem:>8.0f}")
    lines.append("# fwd eq: the backbone linears' multiply-adds in the call's forward passes, in "
                 "frozen forwards of as many samples")
    for name, r in result["rows"].items():
        if "routed_sessions" in r:
            lines.append(f"# {name}: routed to {r['routed_sessions']} sessions (true "
                         f"{r['true_sessions']}), routing accuracy {r['routing_accuracy']:.2f}")
    if m["methods_left_out"]:
        left = m["methods_left_out"]
        lines.append("# left out: " + "; ".join(f"{k} ({v})" for k, v in left.items()))
    lo = result.get("loader")
    if lo:
        rates = [(n, r["samples_per_s"]) for n, r in result["rows"].items()
                 if n.startswith("loader/")]
        lines.append(f"# loader, {lo['samples']} JPEGs {lo['raw_image']} -> {lo['image_size']}, "
                     f"batch {lo['batch']}, one thread, samples/s: " + "; ".join(
                         f"{n} {s['mean']:.1f} +/- {s['std']:.1f}" for n, s in rates))
    lines += comparison_lines(result["comparison"])
    lines += prediction_lines(result.get("prediction"))
    lines += ["", f"{'ratio':<52}{'median':>8}{'min':>8}{'target':>10}  met (min)"]
    rm, rn, targets = result["ratios"]["median"], result["ratios"]["min"], result["targets"]
    for name in sorted(rm, key=lambda n: n not in targets):
        t = targets.get(name)
        mark = f"{t[0]} {t[1]:.2f}" if t else ""
        met = ("yes" if meets(rn[name], t) else "NO") if t else ""
        lines.append(f"{name:<52}{rm[name]:>8.2f}{rn[name]:>8.2f}{mark:>10}  {met}")
    if result["ratios_skipped"]:
        lines.append("# not computed (their rows did not run): "
                     + ", ".join(result["ratios_skipped"]))
    return "\n".join(lines)


def comparison_lines(comp: dict) -> list[str]:
    ref, methods = comp["reference"], comp["methods"]
    if not methods:
        return []
    head = (f"methods against {ref}: median ms; x {ref}, ratio of medians / of minima; fwd, "
            "frozen forwards a call" + ("" if ref in methods else f" ({ref} did not run)"))
    lines = ["", head, f"{'method':<20}{'trains':>10}{'train ms':>10}{'x ' + ref:>14}{'fwd':>6}"
                       f"{'agnostic ms':>13}{'x ' + ref:>14}{'fwd':>6}"]
    for m, kinds in methods.items():
        line = f"{m:<20}{kinds.get('trainable_params', ''):>10}"
        for kind, width in (("train", 10), ("agnostic", 13)):
            k = kinds.get(kind) or {}
            o, f = k.get("over_reference"), k.get("frozen_forwards")
            ratio = f"{o['median']:.2f} / {o['min']:.2f}" if o else ""
            line += f"{k['median_ms']:>{width}.1f}" if k else " " * width
            line += f"{ratio:>14}" + (f"{f:>6.2f}" if f is not None else " " * 6)
        lines.append(line)
    return lines


def prediction_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    a, b, d = p["predict_samples_per_s"], p["evaluate_samples_per_s"], p["difference_samples_per_s"]
    return ["", f"prediction, {p['method']}, batch {p['batch']}: samples/s, mean +/- std over "
                f"{a['n']} rounds, timed alternately",
            f"  delo_dist.load(...).predict_batch     {a['mean']:>9.1f} +/- {a['std']:.1f}",
            f"  ContinualModel.predict (evaluation)   {b['mean']:>9.1f} +/- {b['std']:.1f}",
            f"  difference (paired, per round)        {d['mean']:>9.1f} +/- {d['std']:.1f}: "
            + ("within noise" if p["within_noise"] else "beyond noise")
            + f"; same predictions: {'yes' if p['same_predictions'] else 'NO'}"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except RecipeError as e:  # a --methods / --set that does not build: one line
        print(f"bench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    text = json.dumps(result, indent=2)
    if args.json and args.json != "-":
        Path(args.json).write_text(text + "\n")
    elif args.json == "-":
        print(text)
    print(table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    return result
