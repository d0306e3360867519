"""What every stage shares: the user-error exit, atomic writes (JSON files, whole folders), content
hashes and the number rules of metrics files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SPLITS = ("train", "validation", "test")
# Label of a token position that adds no loss: PyTorch cross-entropy's ignore_index, as Hugging Face
# models expect (prompt tokens of a pair, padding).
IGNORE = -100


class UserError(Exception):
    """A mistake in the user's data or params: reported as one clear message, never a traceback."""


def run_main(main: Callable[[], object]) -> None:
    """Run a stage's main(); a UserError prints ``error: ...`` and exits 2 so `dvc repro` stops."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically: a crash mid-write never leaves a truncated metrics file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; metrics are read by other users and services
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    """Read a JSON artifact of an earlier stage, naming the stage to run when it is missing."""
    if not path.exists():
        raise UserError(f"{path} not found: {what}")
    return json.loads(path.read_text())


def sha256_of(path: Path) -> str:
    """Content hash of a file, or of a folder (relative names and bytes of every file, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextmanager
def replace_dir(dest: Path) -> Iterator[Path]:
    """Write a folder aside and swap it in: the one rule for every stage output folder.

    Yields an empty folder beside ``dest`` (same file system, so the swap is a rename). When the
    block ends normally it replaces ``dest``; the old folder is removed only once the new one is in
    place. When the block raises, ``dest`` is left exactly as it was. A run killed mid-swap leaves
    ``.<name>.old`` without ``dest``: the next call puts it back before anything else.
    """
    new, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
    if old.exists() and not dest.exists():
        old.rename(dest)
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    new.mkdir(parents=True)
    new.chmod(0o755)  # a server reading the folder may run as another user
    try:
        yield new
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)


DIGITS = 6  # decimals kept in metrics files


def rounded(obj):
    """Floats rounded for a readable, diffable metrics file; nesting and ints kept."""
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return round(obj, DIGITS) if isinstance(obj, float) else obj


def is_number(value: object) -> bool:
    """A metric value that can be compared: int or float, not bool (True is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
