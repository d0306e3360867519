"""MLflow at the edges: train's main() opens the run, evaluate's main() reopens it by id.

One run per pipeline execution: the id travels in a small JSON file (``paths.run_info``) that is an
output of train and a dependency of evaluate. Library code never starts runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.common import UserError, read_json, write_json
from lmforge.params import Params, Tracking
from lmforge.tasks import MODEL_SECTIONS

SQLITE = "sqlite:///"
STORE_LOCK_TIMEOUT_S = 120.0  # creating and migrating a new store takes ~2 s
REDACTED = "***"
# A key segment naming a secret: hf_token, api_key, AWS_SECRET_ACCESS_KEY, db.password, auth...
# Whole segments only, so `tokenizer` or `max_tokens` stay readable.
SECRET_KEY = re.compile(
    r"(^|[._-])(token|secret|password|passwd|pwd|passphrase|api_?key|access_?key|private_?key"
    r"|credentials?|auth|authorization|sig|signature)($|[._-])", re.IGNORECASE)
# scheme://user:password@host or scheme://token@host: the password, or a lone user part over http
# (GitHub and hub tokens travel there), becomes ***.
URI_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^\s/@:?#]*)"
                          r"(?::(?P<password>[^\s/@?#]*))?@", re.IGNORECASE)
QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&#\s]+)=(?P<value>[^&#\s]*)")


def is_secret_name(key: str) -> bool:
    """Whether a (dotted) params key or environment variable name looks like it holds a secret."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)  # hfToken -> hf_Token
    return bool(SECRET_KEY.search(snake))


def _userinfo(m: re.Match) -> str:
    if m["password"] is not None:
        return f"{m['scheme']}{m['user']}:{REDACTED}@"
    if m["scheme"].lower().endswith(("http://", "https://")) and m["user"]:
        return f"{m['scheme']}{REDACTED}@"
    return m[0]  # ssh://git@host: a user name, not a secret


def redact_uri(text: str) -> str:
    """``text`` with credentials inside any URI in it replaced by ***: the password of
    ``user:password@``, a lone ``token@`` of an http(s) URI, and secret-named query parameters."""
    text = URI_USERINFO.sub(_userinfo, text)
    return QUERY_PARAM.sub(
        lambda m: f"{m['sep']}{m['key']}={REDACTED}" if is_secret_name(m["key"]) else m[0], text)


def redact(key: str, value: object) -> str:
    """What may be written for ``key = value``: *** for a secret-named key, else the value with any
    credentials in URIs removed."""
    return REDACTED if is_secret_name(key) else redact_uri(str(value))


def configured_uri(cfg: Tracking) -> str:
    """The environment wins over params, so a remote server needs no params change."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


def tracking_uri(cfg: Tracking) -> str:
    """The configured URI, a relative sqlite path made absolute against the repo root.

    The root is DVC_ROOT, which DVC sets for every stage: for a queued experiment it is the repo the
    queue belongs to, not the temp copy the experiment runs in (deleted afterwards, with any store
    inside it). Outside DVC it is the working directory.
    """
    uri = configured_uri(cfg)
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        root = Path(os.environ.get("DVC_ROOT") or ".")
        uri = SQLITE + str((root / uri.removeprefix(SQLITE)).resolve())
    return uri


def use_experiment(name: str, uri: str) -> None:
    """Select the MLflow experiment; a new one in a sqlite store keeps its artifacts beside the store.

    MLflow's default is ./mlruns of the working directory: for a queued experiment, its temp copy.
    """
    import mlflow

    if not uri.startswith(SQLITE):
        mlflow.set_experiment(name)
        return
    store = Path(uri.removeprefix(SQLITE))
    with store_lock(store):
        if mlflow.get_experiment_by_name(name) is None:  # the first call creates a new store
            mlflow.create_experiment(name, artifact_location=str(store.parent / "mlruns" / name))
        mlflow.set_experiment(name)


@contextmanager
def store_lock(store: Path, timeout_s: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``<store>.lock`` while a sqlite store and its experiment are created.

    MLflow creates and migrates a new store's tables without a lock: two queue workers
    (`dvc queue start -j 2`) doing it at once break each other's migrations, and both fail. Once
    the store exists, sqlite's own locking (MLflow waits up to 20 s for a busy database) suffices.
    The lock is an OS file lock: it is released when its process dies, so it never goes stale.
    """
    from filelock import FileLock, Timeout

    store.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{store}.lock")
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise UserError(f"MLflow store {store}: another process held {store}.lock for more than "
                        f"{timeout_s:g} s while creating it; is an `mlflow db upgrade` running?"
                        ) from None
    try:
        yield
    finally:
        lock.release()


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def lineage_tags(data_hash: str) -> dict[str, str]:
    """Tags that trace a run back to its code, data and experiment."""
    tags = {
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        "git.branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data.sha256": data_hash,
    }
    # `dvc exp run` exports these to the stage commands it runs.
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return {key: redact(key, value) for key, value in tags.items()}


def params_hash(params: Params) -> str:
    """SHA-256 of the resolved MODEL_SECTIONS as sorted-key JSON: equal params, equal hash (the
    packaged model's params_sha256 label, matched by `lmforge lineage`)."""
    dumped = params.model_dump(mode="json", by_alias=True)
    blob = json.dumps({name: dumped[name] for name in MODEL_SECTIONS}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def flat_params(params: Params, sections: tuple[str, ...]) -> dict[str, str]:
    """The resolved params sections as dotted keys (MLflow params are flat strings), secrets
    redacted: a secret-named key's value, and credentials inside URIs (``model.source``...)."""
    dumped = params.model_dump(mode="json", by_alias=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = redact(prefix, node)

    for name in sections:
        walk(name, dumped[name])
    return flat


def start_run(params: Params, sections: tuple[str, ...], data_hash: str) -> str:
    """Open a new run (tags + resolved params), record it in paths.run_info, return its id."""
    info = new_run(params, sections, data_hash)
    write_json(params.paths.run_info, info)
    return info["run_id"]


def new_run(params: Params, sections: tuple[str, ...], data_hash: str) -> dict:
    """Open a new run (tags + resolved params); return what paths.run_info records of it. Stage
    train writes that only with the model it trained, so a failed run never replaces it."""
    import mlflow

    # Read before set_tracking_uri, which overwrites MLFLOW_TRACKING_URI in os.environ.
    configured, uri = configured_uri(params.tracking), tracking_uri(params.tracking)
    mlflow.set_tracking_uri(uri)
    use_experiment(params.tracking.experiment, uri)
    with mlflow.start_run(tags=lineage_tags(data_hash)) as run:
        mlflow.log_params(flat_params(params, sections))
    # As configured, not resolved: a relative store stays relative to wherever the repo is cloned.
    # Without its password: run.json is committed and travels into the Bento's labels.
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "tracking_uri": redact_uri(configured)}


@contextmanager
def resume_run(params: Params) -> Iterator[object]:
    """Reopen the run train started (its id is in paths.run_info)."""
    import mlflow

    info = read_json(params.paths.run_info, "run `dvc repro train` first")
    mlflow.set_tracking_uri(tracking_uri(params.tracking))
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def run_id(path: Path) -> str:
    return read_json(path, "run `dvc repro train` first")["run_id"]


def log_to_run(params: Params, flat: dict[str, float], files: list[Path]) -> None:
    """Add test metrics (already flat) and the written files to the run train started."""
    import mlflow

    with resume_run(params):
        mlflow.log_metrics(flat)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
