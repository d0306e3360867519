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
    fail_point([path])
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


# Reserved for tests: a path (as the stage names it, e.g. metrics/train.json) whose write fails
# with an injected error just before it would land, so a test can prove what a failure leaves.
FAIL_ENV = "LMFORGE_TEST_FAIL_WRITING"


def fail_point(dests) -> None:
    """Raise the injected failure when FAIL_ENV names one of ``dests``; a no-op otherwise."""
    target = os.environ.get(FAIL_ENV)
    if target and any(Path(target) == Path(d) for d in dests):
        raise RuntimeError(f"injected failure before writing {target} ({FAIL_ENV})")


def _clear_aside(dest: Path) -> tuple[Path, Path]:
    """The staging box and old copy of ``dest``; a kill mid-swap is repaired, leftovers go."""
    box, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
    if old.exists() and not dest.exists():  # killed between moving dest aside and the new in
        old.rename(dest)
    for leftover in (box, old):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    return box, old


def _swap_in(new: Path, dest: Path, old: Path) -> None:
    if new.is_dir() and dest.exists():
        dest.rename(old)  # a folder cannot replace a folder in one rename
        new.rename(dest)
        shutil.rmtree(old)
    else:
        os.replace(new, dest)


@contextmanager
def write_aside(*dests: Path) -> Iterator[list[Path]]:
    """Write a stage's outputs aside and swap them in together: the one rule for every output.

    Yields, per dest, a path with the same name inside a hidden box beside it (same file system,
    so the swap is a rename; same name, so MLflow logs staged files under their real names). The
    caller makes a file or a folder there. When the block ends normally every written output
    replaces its dest, one after the other with nothing in between that can fail; an output not
    written leaves its dest alone. When the block raises, every dest is left exactly as it was.
    """
    dest_paths = [Path(d) for d in dests]
    staged = []
    try:
        for dest in dest_paths:
            box, _ = _clear_aside(dest)
            box.mkdir(parents=True)
            box.chmod(0o755)  # a server reading the output may run as another user
            staged.append(box / dest.name)
        yield staged
        fail_point(dest_paths)
        for new, dest in zip(staged, dest_paths, strict=True):
            if new.exists():
                _swap_in(new, dest, dest.with_name(f".{dest.name}.old"))
    finally:
        for dest in dest_paths:
            shutil.rmtree(dest.with_name(f".{dest.name}.new"), ignore_errors=True)


@contextmanager
def replace_dir(dest: Path) -> Iterator[Path]:
    """write_aside for one folder: yields it empty, swaps it in when the block ends normally."""
    with write_aside(dest) as (new,):
        new.mkdir()
        yield new


DIGITS = 6  # decimals kept in metrics files


def rounded(obj):
    """Floats rounded for a readable, diffable metrics file; nesting and ints kept."""
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return round(obj, DIGITS) if isinstance(obj, float) else obj


def is_number(value: object) -> bool:
    """A metric value that can be compared: int or float, not bool (True is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
