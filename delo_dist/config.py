"""Recipes: YAML files loaded into typed, validated dataclasses.

`load_recipe(path, overrides)` reads the YAML, applies dotted `key=value` overrides and
checks every key, type and value before anything is trained. Every error names the
recipe file, the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class RecipeError(ValueError):
    """A recipe or override is wrong: the message names file, key and expectation."""


@dataclass
class SyntheticConfig:
    sessions: int = 4
    classes_per_session: int = 4
    train_per_class: int = 48
    val_per_class: int = 8
    test_per_class: int = 24
    image_size: int = 64
    samples_per_shard: int = 200
    seed: int = 0
    variant: Literal["cue", "content"] = "cue"   # content: sessions differ only by content


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    shards: str = "data/synthetic"          # folder holding manifest.json and the tars
    make_synthetic: bool = False            # build the synthetic benchmark there if absent
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    eta: float = 0.7                        # fraction of each split that is incomplete
    missing_type: Literal["none", "text", "image", "both"] = "both"
    both_ratio: float = 0.5                 # share of the incomplete samples that lose the image
    missing_seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int = 0
    sessions: Optional[int] = None          # train only the first N sessions (None: all)
    # Undecodable samples are skipped and reported (key, shard). A test split scores the
    # model: any skip changes the metric, so by default none is allowed. A train split may
    # lose up to this fraction of its samples (rounded down) before the job stops.
    max_bad_samples: int = 0
    max_bad_train_fraction: float = 0.01


@dataclass
class BackboneConfig:
    name: str = "vilt"                      # a key of BACKBONES (delo_dist/models/backbone.py)
    pretrained: Optional[str] = None        # local path or hub id; None: tiny random config
    # ViltConfig keys of the random tiny backbone. initializer_range: BERT's 0.02 is sized for
    # width 768 (per-layer gain 0.02 * sqrt(768) ~ 0.55); at width 64 it would leave a random
    # network with gain 0.16 per linear, so almost no input reaches the pooled feature.
    tiny: dict = field(default_factory=lambda: dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, patch_size=16, initializer_range=0.125))
    image_size: int = 64
    max_text_len: int = 40
    # longer than the position table (pretrained ViLT: 40): how the table grows (models/vilt.py)
    text_position_rule: Literal["resample", "extend"] = "resample"
    # clip: where an encoder takes the other modality's query (delo_dist/models/clip.py): the
    # same layer's input in an adapter-free pass (one more frozen forward), or layer 0's (cheap)
    guide_query: Literal["layer_matched", "first_layer"] = "layer_matched"
    # linears to adapt, by name suffix; null: the method's, else the backbone's default
    # (vilt: query, key, value; clip: q_proj, k_proj, v_proj of both encoders)
    targets: Optional[list] = None
    attention: Literal["sdpa", "eager"] = "sdpa"   # ViLT self-attention: torch's fused SDPA or
                                                   # transformers' matmul + softmax (same result)


@dataclass
class MailConfig:
    """MAIL's mixture of LoRA experts (method.name mail / seq_mail); see models/mail.py."""
    variant: Literal["linear", "attention", "both"] = "both"   # MAIL-l, MAIL-a, MAIL-b
    experts: int = 5                        # mean experts per adapted linear
    rank: int = 4
    alpha: float = 8.0                      # update scaled by alpha / rank
    dropout: float = 0.05                   # LoRA dropout on the expert input
    routing: Literal["top_k", "soft_merge"] = "top_k"
    top_k: int = 2
    allocation: Literal["square", "increasing", "decreasing"] = "square"
    router_input: Literal["sample", "token"] = "sample"   # the paper is silent: see mail.py
    balance: float = 0.0                    # load-balancing loss weight (the paper has none)


@dataclass
class MoraConfig:                           # method.name=mora / seq_mora (the MoRA code's defaults)
    rank: int = 8                           # shared and modality-specific factors
    alpha: float = 0.1
    dropout: float = 0.1
    layers_from: Optional[int] = None       # first adapted layer; null: the top ceil(L/6) layers


@dataclass
class MethodConfig:
    name: str = "delo"                      # a key of METHODS (delo_dist/models/methods.py)
    experts: int = 16                       # E: factor pairs per pool
    rank: int = 4                           # r: factors selected per sample (or LoRA rank)
    factor_rank: int = 1                    # 1: the paper's rank-one pairs; r: official block shape
    alpha: float = 2.0
    a_init_std: Optional[float] = None      # None: 1/sqrt(d_in), LoRA-like scale
    modality_pools: bool = True             # False: ablation "w/o modality-specific pool"
    cross_modal_guide: bool = True          # False: ablation "w/o cross-modal guide"
    lambda_align: float = 0.1
    lambda_con: float = 0.1
    mail: MailConfig = field(default_factory=MailConfig)
    mora: MoraConfig = field(default_factory=MoraConfig)


@dataclass
class TaskIdConfig:
    momentum: float = 0.99
    # task identification (delo_dist/models/task_id.py): paper = Eq. 7/8 as written
    source: Literal["paper", "first_layer", "frozen_pooled", "class_prototypes",
                    "analytic"] = "analytic"   # routes best on the content benchmark


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16                    # per device (micro-batch; a cap if global_batch_size)
    global_batch_size: Optional[int] = None # samples per optimizer step on all devices (batch_plan)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 0               # steps between mid-session checkpoints (0: off)
    # autocast of forward passes (training and evaluation); trainable tensors stay fp32.
    # auto: the launch's ACCELERATE_MIXED_PRECISION (no if unset); fp16 needs a GPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # A NaN/inf loss or gradient norm (agreed by all ranks, checked every optimizer step; its
    # update is never applied). stop: end the job naming the step, the last good checkpoint
    # left as it was; skip: drop that step and go on, at most max_nonfinite_steps a session.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_steps: int = 10
    keep_checkpoints: Optional[int] = None  # session checkpoints kept besides the latest (null: all)
    # A checkpoint that fails its integrity check at resume: stop naming the newest earlier one
    # that verifies (and the command to resume from it), or fall back to it automatically.
    damaged_checkpoint: Literal["stop", "fall_back"] = "stop"
    resume_from: Optional[str] = None       # a checkpoint of this output_dir instead of `latest`


@dataclass
class EvalConfig:
    batch_size: int = 64
    oracle: bool = True                     # also report accuracy with the true session id
    # multi-label macro-F1 over every class seen so far (the reference's) or the session's own
    multilabel_classes: Literal["seen", "session"] = "seen"
    checkpoint: Optional[str] = None        # evaluate this checkpoint folder only (no training)


@dataclass
class TrackingConfig:
    experiment: str = "delo-dist"
    uri: Optional[str] = None               # None: sqlite store beside the output dir
    run_name: Optional[str] = None
    tags: dict = field(default_factory=dict)


@dataclass
class DistributedConfig:
    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    zero_stage: Optional[int] = None        # None: the launch's DeepSpeed config, else 0 (plain DP)


@dataclass
class Recipe:
    name: str = "quickstart"
    seed: int = 0
    output_dir: str = "outputs/quickstart"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task_id: TaskIdConfig = field(default_factory=TaskIdConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- loading

def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{src}: key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, src)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, src)
            except RecipeError:
                continue
        raise RecipeError(f"{src}: key '{key}' expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads an unquoted `no` as false
        if value not in typing.get_args(tp):
            raise RecipeError(f"{src}: key '{key}' expected {_describe(tp)}, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{src}: key '{key}' expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise RecipeError(f"{src}: key '{key}' expected {tp.__name__}, got {value!r}")
    if tp in (int, float, str, bool, list, dict) and not isinstance(value, tp):
        raise RecipeError(f"{src}: key '{key}' expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise RecipeError(f"{src}: unknown key '{key}'; expected one of {sorted(names)}")
        kwargs[k] = _coerce(v, hints[k], key, src)
        default = next(f for f in dataclasses.fields(cls) if f.name == k).default_factory
        if hints[k] is dict and default is not dataclasses.MISSING:
            kwargs[k] = {**default(), **kwargs[k]}  # a dict key overrides, not replaces, defaults
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, src: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{src}: override '{dotted}' goes through a non-mapping key '{p}'")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """safe_load's loader, plus exponent floats without a dot (`1e-4`, `1e3`, `5E+2`): YAML 1.1
    reads those as strings, YAML 1.2 and every person who writes a learning rate as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """yaml.safe_load, with exponent floats (`lr: 1e-4`) read as floats."""
    return yaml.load(text, Loader=_Loader)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"command line: override '{item}' must look like key.sub=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), load_yaml(v) if v != "" else None))
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when path is None) and apply overrides."""
    src = str(path) if path else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"{src}: recipe file not found")
        try:
            tree = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{src}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise RecipeError(f"{src}: the top level must be a mapping of keys")
    _rename_legacy_sections(tree, src)
    given = {}
    for item, (k, v) in zip(overrides or [], parse_overrides(overrides or [])):
        k = _legacy_key(k, "command line")
        given[k] = item
        _set_dotted(tree, k, v, f"command line: override '{item}'")
    try:
        recipe = _build(Recipe, tree, "", src)
        validate(recipe, src)
    except RecipeError as e:
        raise _blame_command_line(e, src, given) from None
    return recipe


# Sections renamed since earlier versions: still read, with a one-line note.
LEGACY_SECTIONS = {"task_keys": "task_id"}
_noted: set[str] = set()


def _note(text: str) -> None:
    """A one-line note on stderr, once per process (sweeps resolve many recipes)."""
    if text not in _noted:
        _noted.add(text)
        print(text, file=sys.stderr, flush=True)


def _legacy_key(key: str, src: str) -> str:
    head, dot, rest = key.partition(".")
    if head in LEGACY_SECTIONS:
        _note(f"{src}: section '{head}' is now '{LEGACY_SECTIONS[head]}' (read as such; rename it)")
        return LEGACY_SECTIONS[head] + dot + rest
    return key


def _rename_legacy_sections(tree: dict, src: str) -> None:
    for old, new in LEGACY_SECTIONS.items():
        if old in tree:
            if new in tree:
                raise RecipeError(f"{src}: sections '{old}' (the old name) and '{new}' both given")
            _note(f"{src}: section '{old}' is now '{new}' (read as such; rename it)")
            tree[new] = tree.pop(old)


def _blame_command_line(e: RecipeError, src: str, given: dict[str, str]) -> RecipeError:
    """An error about a key set on the command line names the override, not the recipe file.
    (Errors are raised as "<src>: key '<dotted>' ...": the key is read back from there.)"""
    msg = str(e)
    found = re.search(r"key '([^']+)'", msg)
    key = found.group(1) if found else None
    # the override set this key, a section above it (a mapping given whole), or a key below
    # it (`trian.epochs=3` makes the unknown section 'trian')
    item = given.get(key) or next((it for k, it in given.items() if key and (
        key.startswith(k + ".") or k.startswith(key + "."))), None)
    if item is None or not msg.startswith(src + ": "):
        return e
    return RecipeError(f"command line: override '{item}'" + msg[len(src):])


def _check(cond: bool, src: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise RecipeError(f"{src}: key '{key}' expected {expected}, got {got!r}")


def validate(r: Recipe, src: str) -> None:
    """Value checks that types cannot express; paths are checked here too."""
    d, m, t = r.data, r.method, r.train
    from delo_dist.models.backbone import BACKBONES
    from delo_dist.models.methods import METHODS
    _check(r.backbone.name in BACKBONES, src, "backbone.name", f"one of {sorted(BACKBONES)}",
           r.backbone.name)
    _check(m.name in METHODS, src, "method.name", f"one of {sorted(METHODS)}", m.name)
    _check(0.0 <= d.eta <= 1.0, src, "data.eta", "a fraction in [0, 1]", d.eta)
    _check(0.0 <= d.both_ratio <= 1.0, src, "data.both_ratio", "a fraction in [0, 1]", d.both_ratio)
    _check(d.shuffle_buffer >= 1, src, "data.shuffle_buffer", "an int >= 1", d.shuffle_buffer)
    _check(d.num_workers >= 0, src, "data.num_workers", "an int >= 0", d.num_workers)
    _check(d.sessions is None or d.sessions >= 1, src, "data.sessions", "null or an int >= 1", d.sessions)
    _check(d.max_bad_samples >= 0, src, "data.max_bad_samples", "an int >= 0", d.max_bad_samples)
    _check(0.0 <= d.max_bad_train_fraction <= 1.0, src, "data.max_bad_train_fraction",
           "a fraction in [0, 1]", d.max_bad_train_fraction)
    if not d.make_synthetic:
        _check((Path(d.shards) / "manifest.json").is_file(), src, "data.shards",
               "a folder with manifest.json (prepare it, or set data.make_synthetic=true)", d.shards)
    _check(m.experts >= 1, src, "method.experts", "an int >= 1", m.experts)
    _check(1 <= m.rank <= m.experts or m.name != "delo", src, "method.rank",
           f"an int in [1, method.experts={m.experts}] (r <= E)", m.rank)
    _check(m.rank >= 1, src, "method.rank", "an int >= 1", m.rank)
    _check(not m.name.endswith("mora") or r.backbone.name == "clip", src, "backbone.name",
           f"clip for method.name={m.name} (MoRA couples a two-encoder backbone's text and image "
           "encoders)", r.backbone.name)
    _check(m.mora.rank >= 1, src, "method.mora.rank", "an int >= 1", m.mora.rank)
    _check(0.0 <= m.mora.dropout < 1.0, src, "method.mora.dropout", "a float in [0, 1)", m.mora.dropout)
    _check(m.mora.layers_from is None or m.mora.layers_from >= 0, src, "method.mora.layers_from",
           "null or an int >= 0", m.mora.layers_from)
    _check(m.factor_rank >= 1, src, "method.factor_rank", "an int >= 1", m.factor_rank)
    mail = m.mail
    _check(mail.experts >= 1, src, "method.mail.experts", "an int >= 1", mail.experts)
    _check(mail.rank >= 1, src, "method.mail.rank", "an int >= 1", mail.rank)
    _check(1 <= mail.top_k <= mail.experts, src, "method.mail.top_k",
           f"an int in [1, method.mail.experts={mail.experts}]", mail.top_k)
    _check(0.0 <= mail.dropout < 1.0, src, "method.mail.dropout", "a float in [0, 1)", mail.dropout)
    _check(mail.balance >= 0, src, "method.mail.balance", "a non-negative weight", mail.balance)
    _check(m.lambda_align >= 0 and m.lambda_con >= 0, src, "method.lambda_align/lambda_con",
           "non-negative weights", (m.lambda_align, m.lambda_con))
    _check(0.0 <= r.task_id.momentum < 1.0, src, "task_id.momentum", "a float in [0, 1)",
           r.task_id.momentum)
    _check(t.epochs >= 1, src, "train.epochs", "an int >= 1", t.epochs)
    _check(t.batch_size >= 1, src, "train.batch_size", "an int >= 1", t.batch_size)
    _check(t.global_batch_size is None or t.global_batch_size >= 1, src, "train.global_batch_size",
           "null or an int >= 1", t.global_batch_size)
    _check(t.lr > 0, src, "train.lr", "a float > 0", t.lr)
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), src, "train.betas",
           "two floats in [0, 1)", t.betas)
    _check(0.0 <= t.warmup_ratio < 1.0, src, "train.warmup_ratio", "a float in [0, 1)", t.warmup_ratio)
    _check(t.max_nonfinite_steps >= 0, src, "train.max_nonfinite_steps", "an int >= 0",
           t.max_nonfinite_steps)
    _check(t.keep_checkpoints is None or t.keep_checkpoints >= 0, src, "train.keep_checkpoints",
           "null (keep all) or an int >= 0", t.keep_checkpoints)
    _check(t.resume_from is None or (Path(t.resume_from) / "state.json").is_file(), src,
           "train.resume_from", "a checkpoint folder holding state.json", t.resume_from)
    _check(r.eval.batch_size >= 1, src, "eval.batch_size", "an int >= 1", r.eval.batch_size)
    _check(r.eval.checkpoint is None or (Path(r.eval.checkpoint) / "state.json").is_file(), src,
           "eval.checkpoint", "a checkpoint folder holding state.json", r.eval.checkpoint)
    _check(r.distributed.zero_stage in (None, 0, 1, 2), src, "distributed.zero_stage",
           "null, 0, 1 or 2 (ZeRO-3 would all-gather the frozen backbone for nothing)",
           r.distributed.zero_stage)
    _check(not re.match(r"^\w+://[^/@]*:[^/@]*@", r.tracking.uri or ""), src, "tracking.uri",
           "a URI without credentials (pass MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
           "in the environment)", re.sub(r"://[^/@]*@", "://***@", r.tracking.uri or ""))
    b = r.backbone
    if b.pretrained and (b.pretrained.startswith((".", "/", "~")) or Path(b.pretrained).exists()):
        _check(Path(b.pretrained).expanduser().is_dir(), src, "backbone.pretrained",
               "an existing model folder (config.json inside) or a hub id", b.pretrained)
    _check(b.targets is None or len(b.targets) >= 1, src, "backbone.targets",
           "null or a non-empty list of linear names", b.targets)


def batch_plan(train: TrainConfig, world: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient accumulation steps) for `world` devices.

    Without train.global_batch_size: micro-batch train.batch_size, no accumulation (the
    global batch is batch_size x world). With it, every world size trains on the same global
    batches: each device's share is global / world samples, cut into micro-batches of
    min(batch_size, share), accumulated share / micro times. A split that is not exact is an
    error naming the numbers: the run would otherwise train a different experiment.
    """
    g, cap = train.global_batch_size, train.batch_size
    if g is None:
        return cap, 1
    if g % world:
        raise RecipeError(f"train.global_batch_size={g} does not split over {world} devices "
                          f"({g} / {world} is not an integer): choose a global batch that is a "
                          f"multiple of the device count, or launch on a divisor of {g}")
    share = g // world
    micro = min(cap, share)
    if share % micro:
        raise RecipeError(f"train.global_batch_size={g} on {world} devices gives {share} samples "
                          f"per device, which micro-batches of train.batch_size={cap} do not "
                          f"divide: set train.batch_size to a divisor of {share}")
    return micro, share // micro


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# Keys that cannot change what a run computes: a relaunch may change them, and comparisons
# ignore them when they group runs. A trailing ".*" covers a whole section. The seed is a
# results key; comparisons treat it as the axis they average over. data.shards is a path:
# the data's identity is the manifest's hash, which the trainer records.
RESULT_NEUTRAL_KEYS = (
    "name", "output_dir", "data.shards", "data.num_workers", "eval.batch_size",
    "eval.checkpoint", "train.log_every", "train.checkpoint_every", "tracking.*",
    "distributed.engine", "train.keep_checkpoints", "train.damaged_checkpoint", "train.resume_from",
    # how a NaN step is handled: a run that finishes under `stop` met none, one under `skip`
    # reports how many it dropped (metrics.json); a relaunch may switch to skip and go on
    "train.nonfinite", "train.max_nonfinite_steps",
)


def result_neutral(key: str) -> bool:
    """True if the dotted recipe key cannot change results (see RESULT_NEUTRAL_KEYS)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
               for k in RESULT_NEUTRAL_KEYS)


def recipe_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Flattened keys whose values differ between two recipe trees: {key: (old, new)}."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
