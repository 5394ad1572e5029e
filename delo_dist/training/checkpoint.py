"""Checkpoints: tensors in safetensors, everything else in JSON. Loading runs no pickle.

    <output_dir>/checkpoints/<tag>/model.safetensors        adapters, prompts, heads, task keys (by name)
    <output_dir>/checkpoints/<tag>/engine-rank<r>.safetensors + .json   optimiser/scheduler
    <output_dir>/checkpoints/<tag>/state.json               progress, metrics so far, Python RNG
    <output_dir>/checkpoints/<tag>/rng-rank<r>.safetensors  torch RNG of each rank
    <output_dir>/checkpoints/latest                         name of the newest complete tag
A checkpoint is written into `<tag>.tmp`, renamed when every rank has written its part, and
only then named in `latest`: a job killed while saving leaves the previous one in force.
Saved by name, not by requires_grad: earlier sessions are frozen but must be kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from delo_dist import dist


def _flatten(obj, tensors: dict, path: str):
    """Replace tensors by {"__tensor__": name}; keep JSON-able values; tuples become lists."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, f"{path}.k{i}"), _flatten(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path}")


def storable(obj) -> bool:
    """Whether `obj` is made of tensors, numbers, strings, lists and dicts only."""
    try:
        _flatten(obj, {}, "probe")
        return True
    except TypeError:
        return False


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def model_tensors(model, include_backbone: bool) -> dict[str, torch.Tensor]:
    """Everything that training changes, by name; the frozen backbone only if asked."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        learned = ".sessions." in name or name.startswith(("heads.", "identifier.", "prompter."))
        if learned or include_backbone:
            out[name] = t.detach().cpu().contiguous()
    return out


def save(out_dir: Path, tag: str, model, engine, state: dict, include_backbone: bool) -> Path:
    root = Path(out_dir) / "checkpoints"
    tmp, final = root / f"{tag}.tmp", root / tag
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    r = dist.rank()
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / f"rng-rank{r}.safetensors"))
    if engine is not None:
        tensors: dict = {}
        skeleton = _flatten(engine.state(), tensors, "e")
        save_file(tensors, str(tmp / f"engine-rank{r}.safetensors"))
        (tmp / f"engine-rank{r}.json").write_text(json.dumps(skeleton))
    if r == 0:
        save_file(model_tensors(model, include_backbone), str(tmp / "model.safetensors"))
        state = {**state, "python_rng": _flatten(random.getstate(), {}, "py")}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    dist.barrier()
    if r == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, root / "latest")
    dist.barrier()
    return final


def latest(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text())
    py = state.pop("python_rng", None)
    if py is not None:
        v = _unflatten(py, {})
        random.setstate((v[0], tuple(v[1]), v[2]))
    mine = path / f"rng-rank{dist.rank()}.safetensors"   # each rank's own stream
    rng = mine if mine.is_file() else path / "rng-rank0.safetensors"  # a different world size
    torch.set_rng_state(load_file(str(rng))["torch_rng"])
    return state


# Tensor-name prefixes of earlier versions, read under today's names.
LEGACY_PREFIXES = {"task_keys.": "identifier."}


def load_model(path: Path, model) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    for old, new in LEGACY_PREFIXES.items():
        tensors = {new + n[len(old):] if n.startswith(old) else n: t for n, t in tensors.items()}
    adopt = getattr(getattr(model, "identifier", None), "adopt_checkpoint", None)
    if adopt is not None:   # the identifier checks (or takes) the layout it was fitted on
        mine = {n[len("identifier."):]: t for n, t in tensors.items() if n.startswith("identifier.")}
        replaced = adopt(mine, path)
        if replaced is not None:
            tensors = {n: t for n, t in tensors.items() if not n.startswith("identifier.")}
            tensors.update({"identifier." + n: t for n, t in replaced.items()})
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{path}/model.safetensors: tensors this model does not have, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def load_engine(path: Path, engine) -> None:
    r = dist.rank()
    tensors = load_file(str(path / f"engine-rank{r}.safetensors"))
    skeleton = json.loads((path / f"engine-rank{r}.json").read_text())
    engine.load_state(_unflatten(skeleton, tensors))
