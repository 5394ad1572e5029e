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

