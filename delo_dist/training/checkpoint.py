"""Checkpoints: tensors in safetensors, everything else in JSON. Loading runs no pickle.

    <output_dir>/checkpoints/<tag>/model.safetensors        adapters, prompts, heads, task identifier (by name)
    <output_dir>/checkpoints/<tag>/engine-rank<r>.safetensors + .json   optimiser/scheduler
    <output_dir>/checkpoints/<tag>/state.json               progress, metrics so far, Python RNG
    <output_dir>/checkpoints/<tag>/rng-rank<r>.safetensors  torch RNG of each rank
    <output_dir>/checkpoints/<tag>/integrity.json           every other file's size and sha256
    <output_dir>/checkpoints/latest                         name of the newest complete tag
A checkpoint is written into `<tag>.tmp`, renamed when every rank has written its part, and
only then named in `latest`: a job killed while saving leaves the previous one in force.
Saved by name, not by requires_grad: earlier sessions are frozen but must be kept.

Integrity: each file's size and sha256 are recorded as it is written (hashed from the bytes
in memory, not read back); `verify` checks them before anything is loaded, so a truncated,
zeroed or altered file stops a resume or an evaluation naming the file, instead of loading
other numbers. `choose_resume` then names the newest earlier checkpoint that verifies (or
falls back to it when the recipe allows). A write that fails (disk full, permission) raises
CheckpointWriteError on every rank with the path and the free space; the `.tmp` folder is
removed and the previous checkpoint stays in force. Files are written by Python (mode 0666
less the umask, like every other output), not by safetensors' own writer (0600).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from delo_dist import dist
from delo_dist.data.files import file_mismatch
from delo_dist.training import stopping

INTEGRITY = "integrity.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not what was written (a ValueError: what
    `delo_dist.load` raises for a bad model folder too)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permission); the previous one is in force."""


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


# ---------------------------------------------------------------- writing
def _write(path: Path, data: bytes) -> dict:
    """Write `data` to `path` (flushed to disk); return its size and sha256."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # write() and close() errors carry no file name: add it
        raise OSError(e.errno, e.strerror, str(path)) from None
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def free_space(path: Path) -> str:
    """'12.0 KiB free' on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        n = float(shutil.disk_usage(p).free)
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} bytes free" if unit == "bytes" else f"{n:.1f} {unit} free"
        n /= 1024


def write_failure(e: OSError, fallback: Path) -> str:
    """One line for a failed write: the path, why, and the space left there."""
    path = Path(e.filename) if e.filename else Path(fallback)
    return f"could not write {path}: {e.strerror or e} ({free_space(path.parent)} on its file system)"


def _attempt(fn: Callable[[], None], where: Path) -> str | None:
    try:
        fn()
        return None
    except OSError as e:
        return write_failure(e, where)


def _fail_together(error: str | None, root: Path, tmp: Path) -> None:
    """Every rank learns whether any rank failed; then all raise, the `.tmp` parts removed."""
    _raise_if_any([e for e in dist.all_gather_objects(error) if e], root, tmp)


def _raise_if_any(errors: list[str], root: Path, tmp: Path) -> None:
    """`errors`, the same on every rank: if any, all raise, the `.tmp` parts removed."""
    if not errors:
        return
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / f"{LATEST}.tmp").unlink(missing_ok=True)
    dist.barrier()
    in_force = latest(root.parent)
    raise CheckpointWriteError(errors[0] + "; nothing half-written is left" + (
        f", the previous checkpoint {in_force} is in force" if in_force else ""))


def save(out_dir: Path, tag: str, model, engine, state: dict, include_backbone: bool) -> Path:
    root = Path(out_dir) / "checkpoints"
    tmp, final = root / f"{tag}.tmp", root / tag
    r = dist.rank()
    records: dict[str, dict] = {}

    def start():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_parts():
        name = f"rng-rank{r}.safetensors"
        records[name] = _write(tmp / name, safetensors_bytes({"torch_rng": torch.get_rng_state()}))
        if engine is not None:
            tensors: dict = {}
            skeleton = _flatten(engine.state(), tensors, "e")
            records[f"engine-rank{r}.safetensors"] = _write(tmp / f"engine-rank{r}.safetensors",
                                                            safetensors_bytes(tensors))
            records[f"engine-rank{r}.json"] = _write(tmp / f"engine-rank{r}.json",
                                                     json.dumps(skeleton).encode())
        if r == 0:
            records["model.safetensors"] = _write(
                tmp / "model.safetensors", safetensors_bytes(model_tensors(model, include_backbone)))
            full = {**state, "python_rng": _flatten(random.getstate(), {}, "py")}
            records["state.json"] = _write(tmp / "state.json", json.dumps(full, indent=1).encode())

    _fail_together(_attempt(start, tmp) if r == 0 else None, root, tmp)
    error = _attempt(write_parts, tmp)
    gathered = dist.all_gather_objects((error, records))
    _raise_if_any([e for e, _ in gathered if e], root, tmp)   # every rank has every error

    def finish():
        files = {name: rec for _, recs in gathered for name, rec in recs.items()}
        _write(tmp / INTEGRITY, json.dumps({"files": files}, indent=1, sort_keys=True).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write(root / f"{LATEST}.tmp", tag.encode())
        os.replace(root / f"{LATEST}.tmp", root / LATEST)

    _fail_together(_attempt(finish, tmp) if r == 0 else None, root, tmp)
    return final


def prune(out_dir: Path, keep: int | None) -> list[Path]:
    """Keep the checkpoint `latest` names and the `keep` newest other session checkpoints;
    remove the rest (and a mid-session one that is no longer the latest). None: keep all."""
    if keep is None:
        return []
    root = Path(out_dir) / "checkpoints"
    current = latest(out_dir)
    others = sorted((d for d in root.glob("session_*") if d.is_dir() and d != current
                     and not d.name.endswith(".tmp")), key=lambda d: d.name, reverse=True)
    doomed = others[keep:]
    if current is not None and current.name != "latest_step" and (root / "latest_step").is_dir():
        doomed.append(root / "latest_step")
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------- reading and checking
def latest(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    return path if name and (path / "state.json").is_file() else None


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is not what was written: missing,
    another size (truncated, grown), other bytes (zeroed, altered)."""
    path = Path(path)
    if not (path / "state.json").is_file() and not (path / INTEGRITY).is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no state.json)")
    records = path / INTEGRITY
    if not records.is_file():   # written before records existed: check what can be read
        _check_readable(path)
        return
    try:
        files = json.loads(records.read_text())["files"]
        expected = {name: (int(rec["bytes"]), str(rec["sha256"])) for name, rec in files.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{records}: unreadable integrity records ({type(e).__name__}: {e})") from None
    for name, (size, sha) in sorted(expected.items()):
        f = path / name
        problem = file_mismatch(f, size, sha)
        if problem == "missing":
            raise CheckpointError(f"{f}: missing, expected {size} bytes")
        if problem is not None and problem.startswith("sha256 "):
            digest = problem[len("sha256 "):]
            raise CheckpointError(f"{f}: sha256 {digest[:16]}..., expected {sha[:16]}... (same "
                                  "size, other bytes: altered since it was written)")
        if problem is not None:   # "<actual> bytes"
            raise CheckpointError(f"{f}: {problem}, expected {size} (cut or overwritten "
                                  "since it was written)")


def _check_readable(path: Path) -> None:
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                load_file(str(f))
        except (ValueError, OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {str(e)[:120]}); this "
                                  "checkpoint predates integrity records") from None


def progress(path: Path) -> tuple[int, int, int] | None:
    """(session, epoch, step in epoch) a checkpoint resumes at; None if unreadable."""
    try:
        s = json.loads((Path(path) / "state.json").read_text())
        return int(s["session"]), int(s["epoch"]), int(s["step_in_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        if Path(path).name.startswith("session_") and Path(path).name[8:].isdigit():
            return int(Path(path).name[8:]) + 1, 0, 0   # session_k is written after session k
        return None


def describe(path: Path) -> str:
    p = progress(path)
    if p is None:
        return Path(path).name
    session, epoch, step = p
    if epoch == step == 0:
        return f"{Path(path).name}, after session {session - 1}"
    return f"{Path(path).name}, session {session} epoch {epoch + 1} step {step}"


def newest_verified(root: Path, before: Path) -> Path | None:
    """The newest checkpoint in `root` older than `before` that verifies."""
    limit = progress(before)
    found = []
    for d in Path(root).iterdir():
        if not d.is_dir() or d.name.endswith(".tmp") or d.resolve() == Path(before).resolve():
            continue
        key = progress(d)
        if key is not None and (limit is None or key < limit):
            found.append((key, d))
    for _, d in sorted(found, reverse=True):
        try:
            verify(d)
            return d
        except CheckpointError:
            continue
    return None


def choose_resume(out_dir: Path, requested: str | None, fall_back: bool,
                  key: str = "train.resume_from") -> tuple[Path | None, str | None]:
    """The checkpoint a relaunch resumes from, verified: `requested` (train.resume_from) or
    what `latest` names; (None, None) when there is none. A damaged one raises
    CheckpointError naming the file, what was expected and the newest earlier checkpoint that
    verifies with the command that relaunches this job with `key` set to it, or, when `fall_back`, is replaced by that one (the
    second value is then the note to print)."""
    root = Path(out_dir) / "checkpoints"
    if requested is not None and Path(requested).resolve().parent != root.resolve():
        raise CheckpointError(f"train.resume_from={requested}: not a checkpoint of this "
                              f"output_dir (expected a folder in {root})")
    if requested is not None:
        target = Path(requested)
    else:
        pointer = root / LATEST
        if not pointer.is_file():
            return None, None
        target = root / pointer.read_text().strip()
    try:
        if target == root:
            raise CheckpointError(f"{root / LATEST}: empty, expected the name of a checkpoint")
        verify(target)
        return target, None
    except CheckpointError as e:
        earlier = newest_verified(root, target)
        if earlier is None:
            raise CheckpointError(f"{e}; no earlier checkpoint in {root} verifies: start again in "
                                  "a new output_dir (or remove this one's checkpoints)") from None
        if fall_back:
            return earlier, (f"{e}; resuming from the newest earlier checkpoint that verifies, "
                             f"{earlier} ({describe(earlier)}), as train.damaged_checkpoint=fall_back says")
        raise CheckpointError(f"{e}; the newest earlier checkpoint that verifies is {earlier} "
                              f"({describe(earlier)}): resume from it with `{_command(key, earlier)}` "
                              "(or set train.damaged_checkpoint=fall_back)") from None


def check_for_eval(path: Path, key: str = "eval.checkpoint") -> None:
    """eval.checkpoint must verify; else name the newest earlier one that does."""
    try:
        verify(path)
    except CheckpointError as e:
        earlier = newest_verified(Path(path).parent, Path(path))
        hint = (f"; the newest earlier checkpoint that verifies is {earlier} ({describe(earlier)}): "
                f"`{_command(key, earlier)}`" if earlier else "")
        raise CheckpointError(f"{e}{hint}") from None


def _command(key: str, path: Path) -> str:
    """This job's command with `key` set to `path` (the hint a damaged checkpoint gives)."""
    return stopping.launch_command(f"{key}={path}")


def _read(path: Path, what: Callable[[], object]):
    """Loading after `verify` should not fail; if it does, name the file."""
    try:
        return what()
    except (ValueError, OSError, KeyError, IndexError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:160]})") from None


def load_state(path: Path) -> dict:
    state = _read(path / "state.json", lambda: json.loads((path / "state.json").read_text()))
    py = state.pop("python_rng", None)
    if py is not None:
        v = _unflatten(py, {})
        random.setstate((v[0], tuple(v[1]), v[2]))
    mine = path / f"rng-rank{dist.rank()}.safetensors"   # each rank's own stream
    rng = mine if mine.is_file() else path / "rng-rank0.safetensors"  # a different world size
    torch.set_rng_state(_read(rng, lambda: load_file(str(rng))["torch_rng"]))
    return state


# Tensor-name prefixes of earlier versions, read under today's names.
LEGACY_PREFIXES = {"task_keys.": "identifier."}


def read_model_tensors(file: Path, model, where: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model file (`file`, safetensors) under today's names (LEGACY_PREFIXES),
    the identifier's as it adopts them (`adopt_checkpoint(tensors, where)`: it checks, or
    takes, the layout it was fitted on, and may rebuild its buffers: read the model's own
    tensors after this). Unreadable: CheckpointError; an identifier's refusal: its error."""
    tensors = _read(file, lambda: load_file(str(file)))
    for old, new in LEGACY_PREFIXES.items():
        tensors = {new + n[len(old):] if n.startswith(old) else n: t for n, t in tensors.items()}
    adopt = getattr(getattr(model, "identifier", None), "adopt_checkpoint", None)
    if adopt is not None:   # the identifier checks (or takes) the layout it was fitted on
        mine = {n[len("identifier."):]: t for n, t in tensors.items() if n.startswith("identifier.")}
        replaced = adopt(mine, where)
        if replaced is not None:
            tensors = {n: t for n, t in tensors.items() if not n.startswith("identifier.")}
            tensors.update({"identifier." + n: t for n, t in replaced.items()})
    return tensors


def load_model(path: Path, model) -> None:
    file = path / "model.safetensors"
    tensors = read_model_tensors(file, model, path)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{file}: tensors this model does not have, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def load_engine(path: Path, engine) -> None:
    r = dist.rank()
    tensors_file, skeleton_file = path / f"engine-rank{r}.safetensors", path / f"engine-rank{r}.json"
    tensors = _read(tensors_file, lambda: load_file(str(tensors_file)))
    skeleton = _read(skeleton_file, lambda: json.loads(skeleton_file.read_text()))
    engine.load_state(_unflatten(skeleton, tensors))
