"""Plug-in registries: methods, backbones and task-identification sources, by name.

A plug-in is one module holding one class; the class carries everything about it (its
name, its recipe section and settings, its needs or capabilities, its losses). Three ways
in, looked up in this order when a recipe names a plug-in:
  1. `register(kind, cls)`: a module that registers itself when imported. A recipe pulls
     such modules in with its top-level key `plugins: [my_pkg.my_method, path/to/file.py]`.
  2. the built-in table below: name -> "module:attribute", imported only when chosen;
  3. Python entry points of installed packages, groups `delo_dist.methods`,
     `delo_dist.backbones`, `delo_dist.task_id` (how pytest and MLflow find theirs).
Nothing here imports torch: a name is resolved, listed or refused without loading a model.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Optional

KINDS = ("method", "backbone", "task_id")
ENTRY_POINT_GROUPS = {"method": "delo_dist.methods", "backbone": "delo_dist.backbones",
                      "task_id": "delo_dist.task_id"}
RECIPE_KEYS = {"method": "method.name", "backbone": "backbone.name", "task_id": "task_id.source"}

BUILTIN: dict[str, dict[str, str]] = {
    "method": {
        "delo": "delo_dist.methods.delo:Delo",
        "lora": "delo_dist.methods.lora:Lora",                # DeLo-LoRA: a static LoRA per session
        "seq_lora": "delo_dist.methods.lora:SeqLora",         # one LoRA fine-tuned across sessions
        "head_only": "delo_dist.methods.head_only:HeadOnly",  # frozen backbone, a head per session
        "mail": "delo_dist.methods.mail:Mail",
        "seq_mail": "delo_dist.methods.mail:SeqMail",
        "mora": "delo_dist.methods.mora:Mora",
        "seq_mora": "delo_dist.methods.mora:SeqMora",
        # prompt methods: one head shared by the sessions' classes (methods/prompting.py)
        "map": "delo_dist.methods.map:MapMethod",
        "msp": "delo_dist.methods.msp:MspMethod",
        "l2p": "delo_dist.methods.l2p:L2PMethod",
        "dualprompt": "delo_dist.methods.dualprompt:DualPromptMethod",
        "coda_prompt": "delo_dist.methods.coda_prompt:CodaPromptMethod",
        "rebq": "delo_dist.methods.rebq:RebQMethod",
    },
    "backbone": {
        "vilt": "delo_dist.models.vilt:ViltBackbone",
        "clip": "delo_dist.models.clip:ClipBackbone",
    },
    "task_id": {
        "analytic": "delo_dist.models.task_id:AnalyticRouter",
        "class_prototypes": "delo_dist.models.task_id:ClassPrototypes",
        "first_layer": "delo_dist.models.task_id:FirstLayerKeys",
        "frozen_pooled": "delo_dist.models.task_id:PooledKeys",
        "paper": "delo_dist.models.task_id:PaperKeys",
    },
}

_registered: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


@dataclass
class NoSettings:
    """A plug-in without settings: its recipe section takes no keys."""


class Plugin:
    """What every plug-in class declares: its name and its recipe section's settings (a
    dataclass with defaults and an optional `validate(check)`, check(cond, key, expected,
    got) naming the key inside the section). Plug-ins of one family may share a section
    (seq_lora reads method.lora.*)."""
    name: ClassVar[str] = ""
    section: ClassVar[Optional[str]] = None
    Settings: ClassVar[type] = NoSettings

    @classmethod
    def section_name(cls) -> str:
        return cls.section or cls.name


@dataclass(frozen=True)
class BenchVariant:
    """One more model `python -m delo_dist.bench` builds for a plug-in; its rows are named
    `<kind>/<plug-in>_<variant>` (row kinds: delo_dist/bench/rows.py)."""
    overrides: dict = field(default_factory=dict)  # recipe overrides (they win over --set)
    rows: tuple = ("train",)
    naive: bool = False              # adapters materialise the per-sample d_out x d_in update
    merged: Optional[bool] = None    # False: a mergeable method predicts without merging
    sessions: Optional[int] = None   # a model of this many sessions, the batch all the newest's
    # "module:function" (model, the entry's recipe) -> extra trainable parameters by name: a
    # reference implementation (e.g. peft's) put into the freshly built model
    reference: Optional[str] = None


@dataclass(frozen=True)
class BenchEntry:
    """How the benchmark times a plug-in: the `bench` of a method or backbone class. A plain
    dict there is BenchEntry(overrides=that dict); None leaves a method out of the default
    run (it still runs when named)."""
    overrides: dict = field(default_factory=dict)  # recipe overrides at the bench's shape
    rows: Optional[tuple] = None                   # the base model's rows (None: by head mode)
    variants: dict = field(default_factory=dict)   # name -> BenchVariant
    # name -> (numerator row, denominator row, target (op, bound) or None); "{backbone}" in a
    # row name is the run's backbone, bound "1 + cf" is 1 + the batch's complete fraction
    ratios: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)       # backbones: the paper's shape (--full)
    # backbones: "module:function" (raw food101-layout folder, backbone, batch size) -> a call
    # that reads every sample the reference way and returns the count (the loader rows)
    loader_reference: Optional[str] = None


def bench_entry(cls: Any) -> Optional[BenchEntry]:
    """The plug-in's BenchEntry (see above), or None."""
    entry = getattr(cls, "bench", None)
    return entry if entry is None or isinstance(entry, BenchEntry) else BenchEntry(dict(entry))


def capabilities(backbone_cls: Any) -> frozenset:
    """What the backbone declares it can do (none declared: the empty set)."""
    return getattr(backbone_cls, "capabilities", frozenset())


def missing_capabilities(method_cls: Any, backbone_cls: Any, settings: Any = None) -> dict:
    """{capability: why the method needs it} for each need the backbone lacks, in the order
    the method lists them. With `settings`, a method whose needs depend on them (a prompt
    position) says them with `needs_for`; without, its class-level `needs`."""
    needs = (method_cls.needs_for(settings)
             if settings is not None and hasattr(method_cls, "needs_for") else method_cls.needs)
    have = capabilities(backbone_cls)
    return {c: why for c, why in needs.items() if c not in have}


class PluginError(ValueError):
    """A plug-in name or file that cannot be resolved; the message names the recipe key."""


def register(kind: str, cls: Any, name: str | None = None) -> Any:
    """Make `cls` available as `name` (default: `cls.name`). Returns cls (usable as a decorator
    through `functools.partial(register, "method")`)."""
    if kind not in KINDS:
        raise PluginError(f"register: unknown kind {kind!r}; kinds: {list(KINDS)}")
    name = name or getattr(cls, "name", None)
    if not name:
        raise PluginError(f"register: {cls!r} has no `name` and none was given")
    _registered[kind][name] = cls
    return cls


def _entry_points(kind: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUPS[kind])}


def names(kind: str) -> list[str]:
    """Every name a recipe may give for this kind: registered, built in, installed."""
    return sorted(set(_registered[kind]) | set(BUILTIN[kind]) | set(_entry_points(kind)))


def load_symbol(spec: str) -> Any:
    """"module:attribute" -> the attribute, its module imported."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def get(kind: str, name: str) -> Any:
    """The plug-in class registered under `name`, imported on first use."""
    if name in _registered[kind]:
        return _registered[kind][name]
    if name in BUILTIN[kind]:
        cls = load_symbol(BUILTIN[kind][name])
    else:
        found = _entry_points(kind).get(name)
        if found is None:
            raise PluginError(f"{RECIPE_KEYS[kind]}: unknown name {name!r}; known: {names(kind)}")
        try:
            cls = found.load()
        except Exception as e:  # a broken third-party package: name it
            raise PluginError(f"{RECIPE_KEYS[kind]}: {name!r} is the entry point {found.value!r} "
                              f"(group {ENTRY_POINT_GROUPS[kind]}), which failed to load: {e}") from e
    return register(kind, cls, name)


def import_plugins(specs: list[str], src: str) -> None:
    """Import the recipe's `plugins`: dotted module names, or paths to .py files (relative to
    the working directory). Each module registers what it holds when imported."""
    for spec in specs:
        try:
            if spec.endswith(".py"):
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise PluginError(f"{src}: key 'plugins' names {spec!r}, which is not a file")
                name = "delo_dist_user_plugin_" + path.stem
                if sys.modules.get(name) is not None and getattr(sys.modules[name], "__file__", None) == str(path):
                    continue  # already imported (sweeps resolve many recipes)
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"{src}: key 'plugins': importing {spec!r} failed: "
                              f"{type(e).__name__}: {e}") from e
