"""Check shards against their manifest: every tar's size and sha256.

    python -m delo_dist.data.verify data/food101

Exit 0 when every tar matches, 1 when one differs or is missing (each named), 2 when the
manifest predates size and hash records (nothing can be checked: re-prepare the shards).
The trainer checks sizes on every run; hashing reads every byte, so it runs on request.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delo_dist.data.files import file_mismatch
from delo_dist.data.shards import has_file_records, read_manifest


def verify(root: str | Path) -> tuple[list[str], int]:
    """-> (problems, tars checked)."""
    manifest = read_manifest(root)
    problems, checked = [], 0
    for k, sess in enumerate(manifest["sessions"]):
        for split, entry in sess["splits"].items():
            for shard, rec in entry.get("files", {}).items():
                checked += 1
                problem = file_mismatch(Path(root) / shard, rec["bytes"], rec["sha256"])
                if problem is None:
                    continue
                if problem.startswith("sha256 "):
                    problem = "sha256 differs from the manifest"
                elif problem != "missing":   # "<actual> bytes"
                    problem += f", manifest says {rec['bytes']}"
                problems.append(f"{shard} (session {k} {split}): {problem}")
    return problems, checked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shards", help="folder holding manifest.json")
    a = p.parse_args(argv)
    if not has_file_records(read_manifest(a.shards)):
        print(f"{a.shards}/manifest.json records no sizes or hashes (written before they were "
              "recorded): nothing can be verified; re-prepare the shards", file=sys.stderr)
        return 2
    problems, checked = verify(a.shards)
    for line in problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    print(f"{a.shards}: {checked - len(problems)} of {checked} tars match the manifest")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
