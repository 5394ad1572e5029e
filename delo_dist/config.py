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
from typing import Any, ClassVar, Literal, Optional

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
    # content: sessions differ only by content; shared: content shared in proportions
    variant: Literal["cue", "content", "shared"] = "cue"


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
    """backbone.*: what every backbone reads, and its own section backbone.<name>.*"""
    _plugin_kind: ClassVar[str] = "backbone"
    _name_key: ClassVar[str] = "name"
    # keys of earlier versions that now live in the backbone's own section
    _legacy: ClassVar[tuple] = ("attention", "text_position_rule", "guide_query")
    name: str = "vilt"                      # a backbone plug-in (delo_dist/plugins.py)
    pretrained: Optional[str] = None        # local path or hub id; None: tiny random config
    # config keys of the random tiny backbone. initializer_range: BERT's 0.02 is sized for
    # width 768 (per-layer gain 0.02 * sqrt(768) ~ 0.55); at width 64 it would leave a random
    # network with gain 0.16 per linear, so almost no input reaches the pooled feature.
    tiny: dict = field(default_factory=lambda: dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, patch_size=16, initializer_range=0.125))
    image_size: int = 64
    max_text_len: int = 40
    # linears to adapt, by name suffix; null: the method's, else the backbone's default
    # (vilt: query, key, value; clip: q_proj, k_proj, v_proj of both encoders)
    targets: Optional[list] = None
    settings: Any = None                    # the backbone's own section (its Settings class)


@dataclass
class MethodConfig:
    """method.name and the method's own section method.<section>.*"""
    _plugin_kind: ClassVar[str] = "method"
    _name_key: ClassVar[str] = "name"
    _legacy: ClassVar[tuple] = ("experts", "rank", "factor_rank", "alpha", "a_init_std",
                                "modality_pools", "cross_modal_guide", "lambda_align",
                                "lambda_con")
    name: str = "delo"                      # a method plug-in (delo_dist/plugins.py)
    settings: Any = None                    # the method's own section (its Settings class)


@dataclass
class TaskIdConfig:
    """task_id.source and the source's own section task_id.<source>.*"""
    _plugin_kind: ClassVar[str] = "task_id"
    _name_key: ClassVar[str] = "source"
    # keys of earlier versions, now under task_id.<source>.* (ema's, analytic's)
    _legacy: ClassVar[tuple] = ("momentum", "layers", "max_dims", "reduce", "projection_seed",
                                "targets")
    # task identification (delo_dist/models/task_id.py): analytic routes best on the content
    # benchmark; paper = Eq. 7/8 as written
    source: str = "analytic"
    settings: Any = None


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
    # user plug-ins to import first: dotted module names or .py files that call
    # delo_dist.plugins.register (README "Adding a method")
    plugins: list = field(default_factory=list)


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
    if hasattr(cls, "_plugin_kind"):
        return _build_plugin_config(cls, values, prefix, src)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise RecipeError(f"{src}: unknown key '{key}'; expected one of {sorted(names)}")
        kwargs[k] = _field_value(cls, hints, k, v, key, src)
    return cls(**kwargs)


def _field_value(cls: type, hints: dict, name: str, value: Any, key: str, src: str) -> Any:
    """A dataclass field's value from the recipe: typed, and a dict merged into the field's
    default dict (a dict key overrides, not replaces, defaults)."""
    value = _coerce(value, hints[name], key, src)
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory
    if hints[name] is dict and default is not dataclasses.MISSING:
        value = {**default(), **value}
    return value


class _SectionCheck:
    """check(cond, key, expected, got) for a plug-in's `validate`: key is inside its section."""

    def __init__(self, src: str, prefix: str):
        self.src, self.prefix = src, prefix

    def __call__(self, cond: bool, key: str, expected: str, got: Any) -> None:
        _check(cond, self.src, f"{self.prefix}.{key}", expected, got)


def _plugin(kind: str, name: Any, key: str, src: str):
    from delo_dist import plugins
    if not isinstance(name, str):
        raise RecipeError(f"{src}: key '{key}' expected str, got {name!r}")
    known = plugins.names(kind)
    if name not in known:
        raise RecipeError(f"{src}: key '{key}': unknown name {name!r}; known: {known}")
    try:
        return plugins.get(kind, name)
    except plugins.PluginError as e:  # a known name whose plug-in fails to load
        raise RecipeError(f"{src}: {e}") from None


def _section_owner(kind: str, section: str):
    """The plug-in whose recipe section is `section`, or None."""
    from delo_dist import plugins
    names = plugins.names(kind)
    candidates = [section] + [n for n in names if n != section] if section in names else names
    for name in candidates:
        cls = plugins.get(kind, name)
        if cls.section_name() == section:
            return cls
    return None


def _settings(plugin, values: dict, prefix: str, src: str) -> Any:
    """A plug-in's section: typed by its Settings dataclass, then its own value checks."""
    settings = _build(plugin.Settings, values, prefix, src)
    if hasattr(settings, "validate"):
        settings.validate(_SectionCheck(src, prefix))
    return settings


def _build_plugin_config(cls: type, values: dict, prefix: str, src: str) -> Any:
    """backbone / method / task_id: the common keys, the chosen plug-in's own section
    (defaults filled in), and keys of earlier versions moved into that section with a note.
    Another plug-in's section may be given (a sweep fixes method.<other>.* while method.name
    varies): it is checked, then left out, since it cannot change what this run computes."""
    kind, name_key = cls._plugin_kind, cls._name_key
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    name = values.get(name_key, fields[name_key].default)
    plugin = _plugin(kind, name, f"{prefix}.{name_key}", src)
    section = plugin.section_name()
    common = [n for n in fields if n != "settings"]
    kwargs, sections, legacy = {}, {}, {}
    for k, v in values.items():
        key = f"{prefix}.{k}"
        if k in common:
            kwargs[k] = _field_value(cls, hints, k, v, key, src)
        elif k in cls._legacy:
            legacy[k] = v
        elif k == section or (k not in ("settings",) and _section_owner(kind, k) is not None):
            if not isinstance(v, dict):
                raise RecipeError(f"{src}: key '{key}' must be a mapping (a plug-in's "
                                  f"section), got {v!r}")
            sections[k] = v
        else:
            raise RecipeError(f"{src}: unknown key '{key}'; expected one of {common} or the "
                              f"section of a {kind} (this {name_key}'s: '{prefix}.{section}')")
    active = dict(sections.get(section) or {})
    own = {f.name for f in dataclasses.fields(plugin.Settings)}
    moved = [k for k in legacy if k in own]
    for k in moved:  # the old place wins: a command line of an earlier version overrides
        active[k] = legacy[k]
    if moved:
        _note(f"{src}: {', '.join(f'{prefix}.{k}' for k in moved)} now live under "
              f"'{prefix}.{section}' (read there; move them)")
    ignored = [k for k in legacy if k not in own]
    if ignored:
        _note(f"{src}: {', '.join(f'{prefix}.{k}' for k in ignored)} (keys of earlier versions) "
              f"are not settings of {name_key} {name!r} ({prefix}.{section}): ignored")
    for other, vals in sections.items():
        if other != section:
            _settings(_section_owner(kind, other), vals, f"{prefix}.{other}", src)
    kwargs["settings"] = _settings(plugin, active, f"{prefix}.{section}", src)
    return cls(**kwargs)


def plugin_class(cfg: Any):
    """The plug-in class a backbone / method / task_id config names."""
    from delo_dist import plugins
    return plugins.get(cfg._plugin_kind, getattr(cfg, cfg._name_key))


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
    for section in ("backbone", "method", "task_id"):  # plug-in sections: always resolved
        if not isinstance(tree.setdefault(section, {}), dict):
            raise RecipeError(f"{src}: key '{section}' must be a mapping, got {tree[section]!r}")
    try:
        _import_plugins(tree, src, given)
        recipe = _build(Recipe, tree, "", src)
        validate(recipe, src)
        check_compatible(recipe, src)
    except RecipeError as e:
        raise _blame_command_line(e, src, given) from None
    return recipe


def _import_plugins(tree: dict, src: str, given: dict) -> None:
    """The recipe's `plugins` (user modules that register methods, backbones, identifiers)
    are imported before any section is read."""
    from delo_dist import plugins
    specs = tree.get("plugins") or []
    if not isinstance(specs, list) or not all(isinstance(x, str) for x in specs):
        raise RecipeError(f"{src}: key 'plugins' expected a list of module names or .py paths, "
                          f"got {specs!r}")
    where = f"command line: override '{given['plugins']}'" if "plugins" in given else src
    try:
        plugins.import_plugins(specs, where)
    except plugins.PluginError as e:
        raise RecipeError(str(e)) from None


def check_compatible(recipe: Recipe, src: str) -> None:
    """The method's needs against the backbone's capabilities: one line naming both. A method
    whose needs depend on its settings (a prompt position) says them with `needs_for`."""
    from delo_dist import plugins
    method, backbone = plugin_class(recipe.method), plugin_class(recipe.backbone)
    missing = plugins.missing_capabilities(method, backbone, recipe.method.settings)
    if missing:
        capability, why = next(iter(missing.items()))   # the first the method lists
        have = plugins.capabilities(backbone)
        raise RecipeError(
            f"{src}: key 'method.name' {recipe.method.name!r} needs the backbone capability "
            f"'{capability}' ({why}), which key 'backbone.name' {recipe.backbone.name!r} "
            f"lacks (it has: {', '.join(sorted(have)) or 'none'})")


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
    item = None
    for key in re.findall(r"key '([^']+)'", msg):  # the first key named that came from there
        parts = key.split(".")
        # a key of an earlier version was moved into its plug-in's section: method.rank was
        # given, method.delo.rank is named
        moved = ".".join(parts[:1] + parts[2:]) if len(parts) > 2 else None
        # the override set this key, a section above it (a mapping given whole), or a key
        # below it (`trian.epochs=3` makes the unknown section 'trian')
        item = given.get(key) or given.get(moved) or next(
            (it for k, it in given.items() if key.startswith(k + ".") or k.startswith(key + ".")),
            None)
        if item is not None:
            break
    if item is None or not msg.startswith(src + ": "):
        return e
    return RecipeError(f"command line: override '{item}'" + msg[len(src):])


def _check(cond: bool, src: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise RecipeError(f"{src}: key '{key}' expected {expected}, got {got!r}")


def validate(r: Recipe, src: str) -> None:
    """Value checks that types cannot express; paths are checked here too. Each plug-in's
    section checks itself (its Settings.validate), when it is built."""
    d, t = r.data, r.train
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
    _check(t.epochs >= 1, src, "train.epochs", "an int >= 1", t.epochs)
    _check(t.batch_size >= 1, src, "train.batch_size", "an int >= 1", t.batch_size)
    _check(t.global_batch_size is None or t.global_batch_size >= 1, src, "train.global_batch_size",
           "null or an int >= 1", t.global_batch_size)
    # bounded: past ~1e35 Adam's first step (lr / (1 - beta1)) overflows float32 inside the
    # optimizer, a traceback instead of the divergence stop that smaller absurd rates reach
    _check(0 < t.lr <= 1e30, src, "train.lr", "a float in (0, 1e30]", t.lr)
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
    """The recipe as a tree, each plug-in's settings under its section name (as written in a
    recipe file): what recipe.resolved.yaml holds and what MLflow params flatten."""
    tree = dataclasses.asdict(recipe)
    for key in ("backbone", "method", "task_id"):
        cfg, node = getattr(recipe, key), tree[key]
        settings = node.pop("settings")
        if settings:
            node[plugin_class(cfg).section_name()] = settings
    return tree


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
    "name", "output_dir", "data.shards", "plugins", "data.num_workers", "eval.batch_size",
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
