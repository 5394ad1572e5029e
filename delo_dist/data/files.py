"""File helpers every writer and checker shares: atomic text writes, sha256, and checking a
file against the size and hash recorded when it was written. Standard library only, so any
module (tracking's command line included) imports it without the data stack."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: into `<path>.tmp`, renamed over `path`. On
    an error (a full disk) the `.tmp` is removed and the OSError raised again naming it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:   # write() and close() errors carry no file name: add it
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(tmp)) from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_mismatch(path: str | Path, size: int, sha256: str | None = None) -> str | None:
    """How `path` differs from the `size` and (when given) `sha256` recorded when it was
    written: None when it matches, else "missing", "<bytes> bytes" (another size) or
    "sha256 <hex digest>" (the same size, other bytes). Callers word the message."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes"
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            return f"sha256 {digest}"
    return None
