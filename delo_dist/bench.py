"""Benchmark: one training step and one inference batch per method, on one backbone and batch.

    python -m delo_dist.bench [--hidden 256 --layers 4 --batch 8 ...] [--full-vilt]
                              [--device cuda --dtype bf16] [--json out.json]

`ratios` holds the issue-13 keys with their targets (TARGETS; the table marks each), from
medians and from minima:
  train_delo_over_peft_lora          DeLo's adapter step / peft LoRA's (same rank, targets)
  train_full_over_ce                 DeLo's full objective / its CE-only step
  infer_agnostic_over_oracle         first-layer task identification / oracle inference
  infer_agnostic_pooled_over_oracle  a key source needing an adapter-free forward (--pooled-source)
  train_T10_over_T1, infer_T10_over_T1  10 past sessions vs 1 (the batch routes to one session)
  vilt_sdpa_over_eager               frozen ViLT forward, SDPA attention / transformers' eager
  loader_over_reference              samples/s on one core: our shard path / PIL open, resize
                                     and ViltProcessor per batch on the same images

Every model is the project's model, built from a recipe (`load_recipe(None, overrides)`),
with the same seed, hence the same frozen ViLT weights. Rows:
  train/*  forward + loss + backward + AdamW step over `set_trainable(k)`'s parameters.
           delo_full adds the rest of DeLo's objective as the trainer runs it: L_align,
           L_con (second forward on the complete samples) and the task-key EMA update.
  infer/*  oracle = `predict_with(batch, true sessions)`; agnostic = `predict(batch, seen=S,
           oracle=False)` (adds the adapter-free key forward) with S task keys set to each
           session's mean frozen query on the batch (routing statistics are in the row).
T1/T10: DeLo models with 1 and 10 sessions; the batch is all of the newest session, the other
sessions' keys are random unit vectors. peft_lora: peft's LoRA (LoraConfig on query/key/value) injected into a copy of the head-only
model's frozen ViLT, the reference for our `lora`. delo_naive: `ctx.naive` (per-sample
d_out x d_in update materialised). bf16 = torch.autocast(bfloat16), fp32 parameters.
All models are built and warmed up first, then the rows are timed round-robin (one call
per row per round, so load bursts from other processes hit all rows alike); the JSON has
median and min per row, and ratios of both. Memory: GPU, the model's resident memory plus
the call's peak above it (max_memory_allocated); CPU, process RSS growth over the model's
build and warm-up (rough: the allocator reuses freed memory).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from delo_dist.config import load_recipe
from delo_dist.models.continual import ContinualModel
from delo_dist.training.objective import objective, observe_task_id
from delo_dist.training.trainer import rss_mb

CLASSES_PER_SESSION = 4
FULL_VILT = dict(hidden=768, layers=12, heads=12, intermediate=3072, image_size=384, patch=32)
FULL_CLIP = dict(hidden=768, layers=12, heads=12, intermediate=3072, image_size=224, patch=16,
                 text_len=77)  # + the text encoder's own shape (CLIP_TEXT) in clip_run
CLIP_TEXT = {"backbone.tiny.text_hidden_size": 512, "backbone.tiny.text_num_attention_heads": 8,
             "backbone.tiny.text_intermediate_size": 2048, "backbone.tiny.projection_dim": 512}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m delo_dist.bench", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=256)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--intermediate", type=int, default=None, help="default: 4 x hidden")
    a("--batch", type=int, default=8)
    a("--text-len", type=int, default=40)
    a("--image-size", type=int, default=384)
    a("--patch", type=int, default=32)
    a("--experts", type=int, default=16)
    a("--rank", type=int, default=4)
    a("--sessions", type=int, default=4)
    a("--repeats", type=int, default=5)
    a("--warmup", type=int, default=2)
    a("--device", default="cpu")
    a("--dtype", choices=["fp32", "bf16"], default="fp32")
    a("--full-vilt", action="store_true", help="ViLT-B/32 shapes (hidden 768, 12 layers, ...)")
    a("--full-objective", action=argparse.BooleanOptionalAction, default=True,
      help="also time DeLo's full objective (L_align + L_con second forward + key EMA)")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a("--pooled-source", default="frozen_pooled",
      help="task_id.source that needs an adapter-free forward (infer_agnostic_pooled_over_oracle)")
    a("--loader-samples", type=int, default=64, help="images for loader_over_reference (0: skip)")
    a("--loader-batch", type=int, default=4)
    a("--clock", choices=["wall", "process"], default="wall",
      help="process: this process's CPU time (steadier on a shared CPU machine; CPU only)")
    a("--seed", type=int, default=0)
    a("--json", default=None, help="write the JSON here (default: stdout)")
    a("--clip", action="store_true", help="CLIP rows instead: DeLo vs MoRA, merged vs unmerged")
    a("--full-clip", action="store_true", help="with --clip: CLIP ViT-B/16 shapes (random weights)")
    args = p.parse_args(argv)
    if args.full_vilt:
        for k, v in FULL_VILT.items():
            setattr(args, k, v)
    if args.full_clip:
        for k, v in FULL_CLIP.items():
            setattr(args, k, v)
    args.intermediate = args.intermediate or 4 * args.hidden
    args.warmup = max(args.warmup, 1)  # the warm-up call also measures memory
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build(args, method: str, factor_rank: int = 1, sessions: int | None = None,
          key_source: str | None = None, attention: str = "sdpa",
          extra: dict | None = None) -> ContinualModel:
    recipe = load_recipe(None, [f"{k}={v}" for k, v in {"backbone.vilt.attention": attention,
        "data.make_synthetic": "true",
        "backbone.tiny.hidden_size": args.hidden, "backbone.tiny.num_hidden_layers": args.layers,
        "backbone.tiny.num_attention_heads": args.heads,
        "backbone.tiny.intermediate_size": args.intermediate, "backbone.tiny.patch_size": args.patch,
        "backbone.image_size": args.image_size, "backbone.max_text_len": args.text_len,
        "method.name": method, "method.delo.experts": args.experts, "method.delo.rank": args.rank,
        "method.delo.factor_rank": factor_rank, "method.lora.rank": args.rank,
        # an EMA-key source: set_ema_keys writes its keys
        "task_id.source": key_source or "first_layer", **(extra or {})}.items()])
    torch.manual_seed(args.seed)  # same frozen ViLT for every method
    S = sessions or args.sessions
    classes = [list(range(k * CLASSES_PER_SESSION, (k + 1) * CLASSES_PER_SESSION)) for k in range(S)]
    model = ContinualModel(recipe, classes, S * CLASSES_PER_SESSION)
    return model.to(args.device)


def set_ema_keys(model: ContinualModel, batch: dict, S: int, only: int | None = None) -> dict:
    """Key k = mean frozen query of the batch's session-k samples (what the EMA tracks), so
    the task-agnostic pass routes about as the oracle does; returns routing statistics."""
    model._first_layer = None  # a fresh identification pass, not a cached forward's queries
    q, present = model.identifier.query(model.identification_features(batch), batch)
    for k in ([only] if only is not None else range(S)):  # per modality: the mean over the
        # session's samples that have it
        w = (present & (batch["session"] == k)[:, None]).unsqueeze(-1).float()
        model.identifier.keys[k] = F.normalize((q.float() * w).sum(0) / w.sum(0).clamp(min=1), dim=-1)
    routed = model.identifier.select(q, present, S)
    return {"routed_sessions": len(routed.unique()), "oracle_sessions": len(batch["session"].unique()),
            "routing_accuracy": float((routed == batch["session"]).float().mean())}


def set_newest_session_keys(model: ContinualModel, batch: dict, S: int) -> dict:
    """The batch (all of session S - 1) sets that session's keys; earlier sessions get random
    unit keys: scoring runs over all S sessions and the batch routes to one."""
    g = torch.Generator().manual_seed(S)
    keys = model.identifier.keys
    keys.copy_(F.normalize(torch.randn(keys.shape, generator=g), dim=-1).to(keys.device))
    return set_ema_keys(model, batch, S, only=S - 1)


def make_batch(args, vocab_size: int) -> dict:
    """A mixed batch as collate would build it: complete, text-missing, image-missing samples."""
    g = torch.Generator().manual_seed(args.seed + 2)
    B, L, S = args.batch, args.text_len, args.sessions
    status = torch.tensor([(0, 1, 0, 2)[i % 4] for i in range(B)])  # half complete
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[status == 1] = 2  # dummy text "": [CLS] [SEP]
    pos = torch.arange(L)
    mask = (pos < lengths[:, None]).long()
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (B, L), generator=g) * mask
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    pixels = torch.randn(B, 3, args.image_size, args.image_size, generator=g).clamp(-1, 1)
    pixels[status == 2] = 1.0  # dummy image: all ones
    session = torch.arange(B) % S
    labels = session * CLASSES_PER_SESSION + torch.arange(B) % CLASSES_PER_SESSION
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
             "missing_text": status == 1, "missing_image": status == 2,
             "session": session, "labels": labels, "keys": [f"bench-{i}" for i in range(B)]}
    return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_batch(batch: dict, k: int) -> dict:
    """The same inputs, all samples labelled in session k (training runs one session)."""
    out = dict(batch)
    out["session"] = torch.full_like(batch["session"], k)
    out["labels"] = k * CLASSES_PER_SESSION + batch["labels"] % CLASSES_PER_SESSION
    return out


def clock(args):
    return time.process_time if args.clock == "process" else time.perf_counter


class Timer:
    """Synchronised wall time of one call; on GPU also the call's peak memory above what was
    allocated before it."""

    def __init__(self, args):
        self.cuda = str(args.device).startswith("cuda")
        if self.cuda and args.clock == "process":
            raise SystemExit("--clock process measures CPU time: use it with --device cpu only")
        self.clock = clock(args)
        self.amp = (torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
                    if args.dtype == "bf16" else contextlib.nullcontext())

    def __call__(self, fn) -> tuple[float, float]:
        extra = 0.0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = self.clock()
        with self.amp:
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        return (self.clock() - t0) * 1e3, extra


def train_step(model, batch: dict, k: int, full: bool = False):
    params = list(model.set_trainable(k).values())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-8)

    def step():  # full: the method's whole objective and identifier update; else L_c alone
        model.train()
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(model, model, batch, k, epoch=0, method_terms=full)
        loss.backward()
        opt.step()
        if full:
            observe_task_id(model, batch, k)
    return step


def infer(model, batch: dict, agnostic: bool, keys: torch.Tensor | None = None):
    def call():
        model.eval()
        if agnostic:
            model.identifier.keys.copy_(keys)  # undo delo_full's key EMA updates
            return model.predict(batch, seen=len(keys), oracle=False)
        return model.predict_with(batch, batch["session"])
    return call


def peft_copy(model: ContinualModel, args) -> ContinualModel:
    """peft's LoRA injected into a copy of a head-only model's frozen ViLT."""
    from peft import LoraConfig, inject_adapter_in_model
    ref = copy.deepcopy(model)
    alpha = load_recipe(None, ["data.make_synthetic=true"]).method.settings.alpha
    cfg = LoraConfig(r=args.rank, lora_alpha=alpha * args.rank,  # scale alpha / r = our alpha
                     target_modules=["query", "key", "value"], lora_dropout=0.0)
    inject_adapter_in_model(cfg, ref.backbone.vilt)
    lora = {id(p) for n, p in ref.named_parameters() if "lora_" in n}
    base_params = ref.session_parameters

    def session_parameters(k):  # peft's LoRA (shared) + session k's head
        out = base_params(k)
        out.update({n: p for n, p in ref.named_parameters() if id(p) in lora})
        return out
    ref.session_parameters = session_parameters
    return ref


# issue 13's ratios: (comparison, target); "cf" stands for the batch's complete fraction
TARGETS = {
    "train_delo_over_peft_lora": ("<=", 1.05),
    "train_full_over_ce": ("<=", "1 + cf"),
    "infer_agnostic_over_oracle": ("<=", 1.03),
    "infer_agnostic_pooled_over_oracle": None,      # reported: what the pooled source costs
    "train_T10_over_T1": ("<=", 1.05),
    "infer_T10_over_T1": ("<=", 1.05),
    "vilt_sdpa_over_eager": ("<", 1.0),
    "loader_over_reference": (">=", 3.0),
}


def target_value(name: str, complete_fraction: float):
    t = TARGETS.get(name)
    if t is None:
        return None
    return t[0], 1.0 + complete_fraction if t[1] == "1 + cf" else t[1]


def meets(value: float, target) -> bool:
    op, bound = target
    return {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]


def _ratios(args, t: dict) -> dict:
    fr = f"delo_fr{args.rank}"
    out = {
        "train_delo_over_peft_lora": t["train/delo"] / t["train/peft_lora"],
        "infer_agnostic_over_oracle": t["infer/delo/agnostic"] / t["infer/delo/oracle"],
        "infer_agnostic_pooled_over_oracle": t["infer/delo_pooled/agnostic"] / t["infer/delo/oracle"],
        "train_T10_over_T1": t["train/delo_T10"] / t["train/delo_T1"],
        "infer_T10_over_T1": t["infer/delo_T10/agnostic"] / t["infer/delo_T1/agnostic"],
        "vilt_sdpa_over_eager": t["infer/vilt/sdpa"] / t["infer/vilt/eager"],
        "train: delo / lora (ours)": t["train/delo"] / t["train/lora"],
        "train: lora (ours) / peft lora": t["train/lora"] / t["train/peft_lora"],
        "train: delo / delo naive": t["train/delo"] / t["train/delo_naive"],
        "infer oracle: delo / delo naive": t["infer/delo/oracle"] / t["infer/delo_naive/oracle"],
        f"train: delo factor_rank {args.rank} / 1": t[f"train/{fr}"] / t["train/delo"],
        f"infer oracle: delo factor_rank {args.rank} / 1": t[f"infer/{fr}/oracle"] / t["infer/delo/oracle"],
    }
    if args.full_objective:
        out["train_full_over_ce"] = t["train/delo_full"] / t["train/delo"]
        out["train: delo full objective / lora (ours)"] = t["train/delo_full"] / t["train/lora"]
    return out


def frozen_forward(model, batch: dict):
    """The frozen ViLT alone (a head-only model has no adapters)."""
    def call():
        with torch.no_grad():
            return model.backbone(batch)
    return call


def loader_throughput(args) -> dict:
    """Samples/s on one core (one process, one torch thread) over the same JPEGs (photo-like,
    512x384): ours = prepared shards through SessionStream + the backbone's collate, the
    trainer's path; reference = PIL open, resize, then ViltProcessor on each batch, the
    official pipeline re-implemented for this measurement. Best and median of rounds."""
    import tempfile
    from pathlib import Path

    from PIL import Image
    from transformers import ViltProcessor

    from delo_dist.data.prepare import prepare
    from delo_dist.data.throughput import make_raw, read_all
    from delo_dist.models.adapters import RoutingContext
    from delo_dist.models.vilt import ViltBackbone
    try:  # transformers >= 5 without torchvision: the PIL backend, named as such
        from transformers import ViltImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import ViltImageProcessor as ImageProcessor
    threads, size, n = torch.get_num_threads(), args.image_size, args.loader_samples
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
            make_raw(raw, n, classes=4, width=512, height=384, seed=args.seed)
            prepare("food101", raw, shards, image_size=size, sessions=1, classes_per_session=4,
                    progress=False)
            recipe = load_recipe(None, ["data.make_synthetic=true", f"backbone.image_size={size}",
                                        f"backbone.max_text_len={args.text_len}"])
            backbone = ViltBackbone(recipe.backbone, RoutingContext())
            texts = json.loads((raw / "text.json").read_text())
            files = sorted((raw / "images").rglob("*.jpg"))
            processor = ViltProcessor(image_processor=ImageProcessor(size={"shortest_edge": size}),
                                      tokenizer=backbone.tokenizer)

            tick = clock(args)

            def reference() -> tuple[int, float]:
                t0 = tick()
                for i in range(0, len(files), args.loader_batch):
                    chunk = files[i:i + args.loader_batch]
                    images = [Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
                              for f in chunk]
                    processor(images=images, text=[texts[f.name] for f in chunk],
                              padding="max_length", truncation=True, max_length=args.text_len,
                              return_tensors="pt")
                return len(files), tick() - t0

            def ours() -> tuple[int, float]:
                t0 = tick()
                count, _ = read_all(shards, backbone.collate, args.loader_batch, workers=0)
                return count, tick() - t0
            rates = {"ours": [], "reference": []}
            for _ in range(max(args.repeats, 1)):
                for name, fn in (("ours", ours), ("reference", reference)):
                    count, seconds = fn()
                    rates[name].append(count / seconds)
    finally:
        torch.set_num_threads(threads)
    out = {f"{name}_samples_per_s": {"median": statistics.median(r), "max": max(r)}
           for name, r in rates.items()}
    out.update(samples=n, raw_image="512x384", image_size=size, batch=args.loader_batch)
    return out


def run(args) -> dict:
    """Build every variant (warming its rows up), then time the rows round-robin, one call per
    row per round: bursts of load from other processes then hit all rows alike."""
    S, k, timer = args.sessions, 0, Timer(args)
    fns, rows, rss0 = {}, {}, rss_mb()
    V = dict  # name, method, factor_rank, naive, sessions, key source, attention
    variants = [V(name="head_only", method="head_only"), V(name="lora", method="lora"),
                V(name="peft_lora", method="head_only"), V(name="delo", method="delo"),
                V(name="delo_naive", method="delo", naive=True),
                V(name=f"delo_fr{args.rank}", method="delo", factor_rank=args.rank),
                V(name="delo_pooled", method="delo", key_source=args.pooled_source),
                V(name="delo_T1", method="delo", sessions=1),
                V(name="delo_T10", method="delo", sessions=10),
                V(name="vilt_eager", method="head_only", attention="eager")]
    batch = None
    for v in variants:
        name = v["name"]
        rss_start = rss_mb()
        resident = torch.cuda.memory_allocated() if timer.cuda else 0
        model = build(args, v["method"], v.get("factor_rank", 1), v.get("sessions"),
                      v.get("key_source"), v.get("attention", "sdpa"))
        if name == "peft_lora":
            model = peft_copy(model, args)
        model.ctx.naive = v.get("naive", False)
        if batch is None:
            batch = make_batch(args, model.backbone.vilt.config.vocab_size)
        tb = train_batch(batch, k)
        mine, routing = {}, None
        if name.startswith("delo_T"):  # the newest session: train it, route to it
            n_s = v["sessions"]
            newest = train_batch(batch, n_s - 1)
            mine[f"train/{name}"] = train_step(model, newest, n_s - 1)
            routing = set_newest_session_keys(model, newest, n_s)
            mine[f"infer/{name}/agnostic"] = infer(model, newest, True, model.identifier.keys.clone())
        elif name == "delo_pooled":
            routing = set_ema_keys(model, batch, S)
            mine[f"infer/{name}/agnostic"] = infer(model, batch, True, model.identifier.keys[:S].clone())
        elif name == "vilt_eager":
            mine["infer/vilt/eager"] = frozen_forward(model, batch)
        else:
            mine[f"train/{name}"] = train_step(model, tb, k)
            if name == "delo" and args.full_objective:
                mine["train/delo_full"] = train_step(model, tb, k, full=True)
            mine[f"infer/{name}/oracle"] = infer(model, batch, False)
            if name == "head_only":
                mine["infer/vilt/sdpa"] = frozen_forward(model, batch)
            if name not in ("peft_lora", "delo_naive"):
                routing = set_ema_keys(model, batch, S)
                mine[f"infer/{name}/agnostic"] = infer(model, batch, True, model.identifier.keys[:S].clone())
        extra = {r: max(timer(fn)[1] for _ in range(args.warmup)) for r, fn in mine.items()}
        for r in mine:
            rows[r] = {"times_ms": []}
            if timer.cuda:  # this model's weights and optimiser state + the call's working set
                model_mb = (torch.cuda.memory_allocated() - resident) / 2 ** 20
                rows[r].update(model_mb=model_mb, peak_mem_mb=model_mb + extra[r])
            else:  # process RSS growth over the build and warm-up of this model (rough)
                rows[r]["rss_delta_mb"] = rss_mb() - rss_start
            if r.endswith("agnostic") and routing:
                rows[r].update(routing)
        fns.update(mine)
    for _ in range(args.repeats):
        for r, fn in fns.items():
            ms, extra = timer(fn)
            rows[r]["times_ms"].append(ms)
            if timer.cuda:
                rows[r]["peak_mem_mb"] = max(rows[r]["peak_mem_mb"], rows[r]["model_mb"] + extra)
    for r in rows.values():
        r.update(median_ms=statistics.median(r["times_ms"]), min_ms=min(r["times_ms"]),
                 repeats=len(r["times_ms"]))
    ratios = {"median": _ratios(args, {r: v["median_ms"] for r, v in rows.items()}),
              "min": _ratios(args, {r: v["min_ms"] for r, v in rows.items()})}
    loader = loader_throughput(args) if args.loader_samples > 0 else None
    if loader:  # a throughput ratio: "min" pairs the best rounds (the minimum times)
        ours, ref = loader["ours_samples_per_s"], loader["reference_samples_per_s"]
        ratios["median"]["loader_over_reference"] = ours["median"] / ref["median"]
        ratios["min"]["loader_over_reference"] = ours["max"] / ref["max"]
    import peft
    import platform
    import transformers
    complete = ~(batch["missing_text"] | batch["missing_image"])
    return {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or
                        platform.machine(), "cpu_count": os.cpu_count(),
                        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "complete_fraction": complete.float().mean().item(),
            "pooled_source": args.pooled_source,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": str(args.device), "dtype": args.dtype,
            "device_name": (torch.cuda.get_device_name() if str(args.device).startswith("cuda")
                            else f"cpu ({torch.get_num_threads()} threads)"),
            "note": ("timings from a shared machine: other processes add noise; rows run "
                     "round-robin; ratios of medians and of minima"),
            "shapes": {k_: getattr(args, k_) for k_ in (
                "hidden", "layers", "heads", "intermediate", "batch", "text_len", "image_size",
                "patch", "experts", "rank", "sessions")},
            "tokens": args.text_len + (args.image_size // args.patch) ** 2 + 1,
            "warmup": args.warmup, "repeats": args.repeats, "rss_start_mb": rss0,
            "clock": args.clock,
        },
        "rows": rows, "ratios": ratios, "loader": loader,
        "targets": {name: target_value(name, complete.float().mean().item()) for name in TARGETS},
    }


def table(result: dict) -> str:
    m = result["meta"]
    lines = [f"# {m['device_name']}, {m['dtype']}, torch {m['torch']}, {m['date']} -- {m['note']}",
             "# " + ", ".join(f"{k}={v}" for k, v in m["shapes"].items()) + f", tokens={m['tokens']}",
             f"{'row':<28}{'median ms':>12}{'min ms':>12}{'mem MB':>10}"]
    for name, r in result["rows"].items():
        mem = r.get("peak_mem_mb", r.get("rss_delta_mb", math.nan))
        lines.append(f"{name:<28}{r['median_ms']:>12.1f}{r['min_ms']:>12.1f}{mem:>10.0f}")
    for name, r in result["rows"].items():
        if "routed_sessions" in r:
            lines.append(f"# {name}: routed to {r['routed_sessions']} sessions (oracle "
                         f"{r['oracle_sessions']}), routing accuracy {r['routing_accuracy']:.2f}")
    if result.get("loader"):
        lo = result["loader"]
        lines.append(f"# loader, samples/s on one core (median, best): ours "
                     f"{lo['ours_samples_per_s']['median']:.1f}, {lo['ours_samples_per_s']['max']:.1f}; "
                     f"reference {lo['reference_samples_per_s']['median']:.1f}, "
                     f"{lo['reference_samples_per_s']['max']:.1f}")
    lines.append("")
    lines.append(f"# complete_fraction={m['complete_fraction']:.2f}")
    lines.append(f"{'ratio':<48}{'median':>8}{'min':>8}{'target':>10}  met (min)")
    rm, rn = result["ratios"]["median"], result["ratios"]["min"]
    for name in sorted(rm, key=lambda n: (n not in TARGETS, list(TARGETS).index(n) if n in TARGETS else 0)):
        target = result["targets"].get(name)
        mark = f"{target[0]} {target[1]:.2f}" if target else ""
        met = ("yes" if meets(rn[name], target) else "NO") if target else ""
        lines.append(f"{name:<48}{rm[name]:>8.2f}{rn[name]:>8.2f}{mark:>10}  {met}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLIP rows

def clip_run(args) -> dict:
    """CLIP (both encoders at the --hidden/--layers shape) with DeLo, MoRA and the frozen
    reference: one training step each; inference on one session's batch and on a batch that
    mixes sessions, MoRA merged (one F.linear per adapted linear, sub-batch per session) and
    unmerged (activation path). Rows run round-robin as in `run`."""
    k, timer = 0, Timer(args)
    clip = {"backbone.name": "clip", **(CLIP_TEXT if args.full_clip else {})}
    fns, rows = {}, {}
    batch = one = None
    for name in ("head_only", "delo", "mora"):
        model = build(args, name, extra=clip)
        if batch is None:
            batch = make_batch(args, model.backbone.clip.config.text_config.vocab_size)
            one = train_batch(batch, k)
        mine = {f"train/clip_{name}": train_step(model, one, k)}
        if name == "mora":
            for merged in (True, False):
                tag = "merged" if merged else "unmerged"

                def call(b, merged=merged, model=model):
                    model.eval()
                    model.merged_inference = merged
                    return model.predict_with(b, b["session"])
                mine[f"infer/clip_mora/{tag}/one_session"] = lambda c=call: c(one)
            mine["infer/clip_mora/mixed"] = lambda c=call: c(batch)  # activation path either way
        else:
            mine[f"infer/clip_{name}/one_session"] = infer(model, one, False)
            mine[f"infer/clip_{name}/mixed"] = infer(model, batch, False)
        for r, fn in mine.items():
            for _ in range(args.warmup):
                timer(fn)
            rows[r] = {"times_ms": [], "trainable_params": sum(
                p.numel() for p in model.session_parameters(k).values())}
        fns.update(mine)
    for _ in range(args.repeats):
        for r, fn in fns.items():
            rows[r]["times_ms"].append(timer(fn)[0])
    for r in rows.values():
        r.update(median_ms=statistics.median(r["times_ms"]), min_ms=min(r["times_ms"]),
                 repeats=len(r["times_ms"]))

    def ratios(key):
        t = {r: v[key] for r, v in rows.items()}
        return {
            "infer one session: mora merged / unmerged":
                t["infer/clip_mora/merged/one_session"] / t["infer/clip_mora/unmerged/one_session"],
            "infer one session: mora merged / frozen CLIP":
                t["infer/clip_mora/merged/one_session"] / t["infer/clip_head_only/one_session"],
            "infer mixed / one session: mora":
                t["infer/clip_mora/mixed"] / t["infer/clip_mora/merged/one_session"],
            "infer one session: delo / mora merged":
                t["infer/clip_delo/one_session"] / t["infer/clip_mora/merged/one_session"],
            "train: mora / delo": t["train/clip_mora"] / t["train/clip_delo"],
        }
    return {"meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "torch": torch.__version__, "device": str(args.device), "dtype": args.dtype,
                     "note": "CLIP rows; both encoders at the given shape; round-robin timing",
                     "shapes": {k_: getattr(args, k_) for k_ in (
                         "hidden", "layers", "heads", "batch", "text_len", "image_size", "patch",
                         "experts", "rank", "sessions")},
                     "tokens": args.text_len + (args.image_size // args.patch) ** 2 + 1},
            "rows": rows, "ratios": {"median": ratios("median_ms"), "min": ratios("min_ms")}}


def clip_table(result: dict) -> str:
    m = result["meta"]
    lines = [f"# CLIP, {m['device']}, {m['dtype']}, torch {m['torch']}, {m['date']}",
             "# " + ", ".join(f"{k}={v}" for k, v in m["shapes"].items()),
             f"{'row':<40}{'median ms':>12}{'min ms':>12}{'trainable':>12}"]
    lines += [f"{n:<40}{r['median_ms']:>12.1f}{r['min_ms']:>12.1f}{r['trainable_params']:>12}"
              for n, r in result["rows"].items()]
    lines += ["", f"{'ratio':<48}{'median':>8}{'min':>8}"]
    rm, rn = result["ratios"]["median"], result["ratios"]["min"]
    lines += [f"{n:<48}{rm[n]:>8.2f}{rn[n]:>8.2f}" for n in rm]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.clip:
        result = clip_run(args)
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
        print(clip_table(result))
        return result
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(table(result), file=sys.stderr if not args.json else sys.stdout)
    return result


if __name__ == "__main__":
    main()
