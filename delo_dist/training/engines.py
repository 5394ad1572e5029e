"""Per-session optimisation engines, rebuilt at every session.

Only the active session's parameters enter the optimiser, and requires_grad is set before
the engine is built (DeepSpeed does not follow requires_grad changes made afterwards).
  - TorchEngine: one process, torch AdamW + warmup-cosine (transformers' schedule).
  - DeepSpeedEngine: ZeRO stage 0/1/2 over the active session's parameters; their gradients
    and AdamW state are partitioned across ranks; the frozen backbone and earlier sessions
    stay outside the optimiser. `destroy()` frees it before the next session's engine.
Both expose forward / backward / step, the optimiser-state size and a state for checkpoints.
With gradient accumulation (`accum` micro-batches per optimizer step) the trainer still
calls backward and step once per micro-batch: backward scales the loss by 1 / accum and
step only updates on the accum-th call (DeepSpeed does both itself from its config).
At that call `step` returns the gradient norm, and neither engine applies a non-finite one:
the update is dropped and the schedule does not advance (what DeepSpeed's ZeRO optimizer
does on overflow; the torch engine and ZeRO stage 0 do the same here). The trainer reads the
norm to stop or to count the dropped step (train.nonfinite).

Mixed precision (`train.mixed_precision`) is torch autocast around the forward pass and the
loss (`autocast(precision, device)`), for both engines: the trainable tensors, their
gradients and the optimiser state stay fp32 (they are the master weights). DeepSpeed's own
bf16 mode is not used: it casts every parameter of the module (frozen backbone and trainable
tensors) to bf16, keeps fp32 master copies inside its optimiser only, and leaves the fp32
inputs (pixels) to meet bf16 weights; checkpoints would then hold bf16 adapters.
fp16 runs with a GradScaler on a GPU with the torch engine only.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
from transformers import get_cosine_schedule_with_warmup


def _schedule(optimizer, cfg, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))


def _adamw_kwargs(cfg) -> dict:
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if torch.is_tensor(t))


def resolve_precision(value: str, device: torch.device, engine: str) -> str:
    """train.mixed_precision -> "no" | "bf16" | "fp16"; auto takes the launch's
    ACCELERATE_MIXED_PRECISION (accelerate launch --mixed_precision, or its config file)."""
    src = "train.mixed_precision"
    if value == "auto":
        value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        src = f"train.mixed_precision=auto (ACCELERATE_MIXED_PRECISION={value!r})"
    if value not in ("no", "bf16", "fp16"):
        raise ValueError(f"{src}: expected no, bf16 or fp16")
    if value == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"{src}: fp16 needs a GPU (a GradScaler on CUDA); on CPU use bf16 or no")
    if value == "fp16" and engine != "torch":
        raise ValueError(f"{src}: fp16 is supported with the torch engine only; use bf16 with "
                         "DeepSpeed")
    return value


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


class TorchEngine:
    name = "torch"

    def __init__(self, model, params: dict, cfg, total_steps: int, accum: int = 1,
                 precision: str = "no"):
        self.model, self.cfg = model, cfg
        self.accum, self.micro_steps = accum, 0
        self.params = list(params.values())
        self.optimizer = torch.optim.AdamW(self.params, **_adamw_kwargs(cfg))
        self.scheduler = _schedule(self.optimizer, cfg, total_steps)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum if self.accum > 1 else loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float | None:
        """Count a micro-batch; at the step's last one, update unless the gradient norm is
        non-finite. Returns that norm (None between micro-batches, and under fp16, whose
        GradScaler skips overflowing steps and lowers its scale as it should)."""
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return None  # gradients keep accumulating until the step's last micro-batch
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return None
        total = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        norm = float(total)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)   # dropped: no update, no schedule step
            return norm
        if self.cfg.grad_clip > 0:   # clip_grad_norm_ is these two calls; the norm is kept
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.grad_clip, total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def optimizer_state_bytes(self) -> int:
        return _state_bytes(self.optimizer)

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def destroy(self) -> None:
        self.optimizer.state.clear()


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, params: dict, cfg, total_steps: int, world: int, zero_stage: int,
                 micro: int | None = None, accum: int = 1):
        import deepspeed
        self.cfg, self.zero_stage = cfg, zero_stage
        self.params = list(params.values())
        micro = micro or cfg.batch_size
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world,
            "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": zero_stage},
            "optimizer": {"type": "AdamW", "params": {**_adamw_kwargs(cfg), "torch_adam": True}},
            "bf16": {"enabled": False},  # mixed precision is torch autocast (module docstring)
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        config["optimizer"]["params"]["betas"] = list(cfg.betas)
        # Parameter groups holding no trainable tensor break ZeRO partitioning: one group.
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=list(params.values()), config=config,
            lr_scheduler=lambda opt: _schedule(opt, cfg, total_steps))

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        """At an optimizer step, the global gradient norm (equal on every rank). ZeRO 1/2
        computes it and drops a non-finite step itself (its overflow rule); stage 0 would
        apply it, so the norm is taken here from the all-reduced gradients and a non-finite
        one removed first: AdamW leaves a parameter without a gradient untouched (its state
        too), only the schedule moves on."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.zero_stage == 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            if not math.isfinite(norm):
                for p in self.params:
                    p.grad = None
                config, clip = self.engine._config, self.engine._config.gradient_clipping
                config.gradient_clipping = 0.0   # DeepSpeed's clipping fails on no gradient
                try:
                    self.engine.step()
                finally:
                    config.gradient_clipping = clip
                return norm
        self.engine.step()
        if not boundary:
            return None
        if norm is None:
            got = self.engine.get_global_grad_norm()
            norm = None if got is None else float(got)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def optimizer_state_bytes(self) -> int:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps torch AdamW
        return _state_bytes(inner)

    def state(self) -> dict:
        """ZeRO's optimizer state without its Python objects (the loss scaler): checkpoints
        hold tensors and JSON only, and loading takes those objects from the fresh engine."""
        from delo_dist.training.checkpoint import storable
        sd = self.optimizer.state_dict()
        return {"optimizer": {k: v for k, v in sd.items() if storable(v)},
                "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict) -> None:
        merged = {**self.optimizer.state_dict(), **state["optimizer"]}
        if hasattr(self.optimizer, "partition_count"):  # ZeRO 1/2: one entry per data-parallel rank
            import torch.distributed as tdist
            self.optimizer.load_state_dict([merged] * tdist.get_world_size())
        else:
            self.optimizer.load_state_dict(merged)
        self.scheduler.load_state_dict(state["scheduler"])

    def destroy(self) -> None:
        self.engine.destroy()
        self.engine = self.optimizer = self.scheduler = None


class LaunchError(RuntimeError):
    """The launch (processes, devices) and the recipe disagree."""


def engine_kind(recipe, world: int) -> str:
    """distributed.engine resolved for this launch: torch (one process) or deepspeed."""
    kind = recipe.distributed.engine
    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if kind == "auto":
        kind = "deepspeed" if (launched_ds or world > 1) else "torch"
    if kind == "torch" and world > 1:
        raise LaunchError(f"distributed.engine=torch runs one process, but {world} were "
                          "launched: use engine=deepspeed (zero_stage 0 is plain data parallel)")
    if kind == "deepspeed" and world == 1 and not torch.cuda.is_available():
        raise LaunchError("DeepSpeed ZeRO on CPU needs 2 or more processes (gloo); this launch "
                          "has 1 and no GPU: launch with accelerate_configs/cpu_2proc_zero2.yaml "
                          "or set distributed.engine=torch")
    return kind


def build_engine(kind: str, model, params: dict, recipe, total_steps: int, world: int,
                 micro: int, accum: int, precision: str):
    """A fresh engine over session k's parameters (`params`) for `total_steps` steps."""
    if kind == "torch":
        return TorchEngine(model, params, recipe.train, total_steps, accum=accum,
                           precision=precision)
    stage = recipe.distributed.zero_stage  # the recipe wins, else the launch config
    if stage is None:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))
    return DeepSpeedEngine(model, params, recipe.train, total_steps, world, stage,
                           micro=micro, accum=accum)


def check_launch(manifest: dict, n_sessions: int, world: int, micro: int, accum: int) -> None:
    """Several ranks: every rank needs a test sample and a share of every global batch."""
    for k in range(n_sessions if world > 1 else 0):
        count = manifest["sessions"][k]["splits"]["test"]["count"]
        if count < world:
            raise LaunchError(f"session {k} has {count} test samples for {world} ranks: "
                              "each rank needs at least one")
        train = manifest["sessions"][k]["splits"]["train"]["count"]
        if train < micro * accum * world:
            raise LaunchError(f"session {k} has {train} training samples, fewer than one global "
                              f"batch ({micro} x {accum} accumulated x {world} ranks)")
