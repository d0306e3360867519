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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.common import UserError, read_json, write_json
from lmforge.params import Params, Paths, Tracking
from lmforge.tasks import CAUSAL_LM, MODEL_SECTIONS

SQLITE = "sqlite:///"
STORE_LOCK_TIMEOUT_S = 120.0  # creating and migrating a new store takes ~2 s
REDACTED = "***"
# MLflow's own source tags (mlflow.utils.mlflow_tags), set explicitly: MLflow detects the commit
# only when the entry point is a file in the repo, not under pytest or an imported main().
GIT_COMMIT, GIT_BRANCH = "mlflow.source.git.commit", "mlflow.source.git.branch"
MODEL_NAME = "model"  # the logged model's name in the run
EXAMPLE_TOKENS = 16  # plain-text causal_lm: tokens of a block that make an example prompt
DATASET_CONTEXT = {"train": "training", "validation": "validation", "test": "testing"}
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")  # the logged model's loader
TRAINED, ALIGNED = 0, 1  # the step a model is logged at in the run's outputs: by train, by align
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


def own_files(paths: Paths) -> list[Path]:
    """What a run's git.dirty ignores: every path of ``paths:`` and dvc.lock (the pipeline's own
    outputs: a real `dvc repro` rewrites the committed metrics, plots and run.json), and
    params.yaml (an input, but the run records its resolved params, and `dvc exp run -S` edits it
    by design: the tag answers "is the code the commit's?")."""
    return [*paths.model_dump().values(), Path("dvc.lock"), Path("params.yaml")]


def git_state(ignore: Iterable[Path] = ()) -> dict[str, str]:
    """The checkout's commit, branch, and ``dirty``: whether tracked files other than ``ignore``
    (files, or folders and all below them) differ from the commit; "unknown" outside git."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"commit": "unknown", "branch": "unknown", "dirty": "unknown"}
    top = Path(_git("rev-parse", "--show-toplevel"))
    skip = [Path(p).resolve() for p in ignore]
    changed = [(top / name).resolve()
               for name in _git("diff", "--name-only", "-z", "HEAD").split("\0") if name]
    dirty = any(not any(f == s or s in f.parents for s in skip) for f in changed)
    return {"commit": commit, "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
            "dirty": str(dirty).lower()}


def lineage_tags(data_hash: str, ignore: Iterable[Path] = ()) -> dict[str, str]:
    """Tags that trace a run back to its code, data and experiment. The commit and branch go in
    MLflow's own source tags (the run page shows them); git.dirty (see git_state) is ours."""
    git = git_state(ignore)
    tags = {GIT_COMMIT: git["commit"], GIT_BRANCH: git["branch"], "git.dirty": git["dirty"],
            "data.sha256": data_hash}
    # `dvc exp run` exports these to the stage commands it runs.
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return {key: redact(key, value) for key, value in tags.items()}


def params_hash(params: Params) -> str:
    """SHA-256 of the resolved MODEL_SECTIONS, and ``align`` while align is on, as sorted-key
    JSON: equal params, equal hash (the packaged model's params_sha256 label, matched by
    `lmforge lineage`). Align off leaves the hash as it was without the stage."""
    dumped = params.model_dump(mode="json", by_alias=True)
    sections = MODEL_SECTIONS + (("align",) if params.align.method != "none" else ())
    blob = json.dumps({name: dumped[name] for name in sections}, sort_keys=True,
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
    with mlflow.start_run(tags=lineage_tags(data_hash, own_files(params.paths))) as run:
        mlflow.log_params(flat_params(params, sections))
    # As configured, not resolved: a relative store stays relative to wherever the repo is cloned.
    # Without its password: run.json is committed and travels into the Bento's labels.
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "tracking_uri": redact_uri(configured)}


@contextmanager
def resume_run(params: Params, run_id: str | None = None) -> Iterator[object]:
    """Reopen the run train started (``run_id``, else the one in paths.run_info)."""
    import mlflow

    run_id = run_id or read_json(params.paths.run_info, "run `dvc repro train` first")["run_id"]
    mlflow.set_tracking_uri(tracking_uri(params.tracking))
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def run_id(path: Path) -> str:
    return read_json(path, "run `dvc repro train` first")["run_id"]


def logged_model_id(client, run_id: str, step: int = TRAINED) -> str | None:
    """The model logged into the run at ``step`` (TRAINED: train's, ALIGNED: align's), the newest
    should there be several (align re-run with new params), or None."""
    outputs = client.get_run(run_id).outputs
    ids = [m.model_id for m in (outputs.model_outputs if outputs else []) if m.step == step]
    created = {i: client.get_logged_model(i).creation_timestamp for i in ids}
    return max(ids, key=created.get) if ids else None


def requirements() -> list[str]:
    """What the logged model needs, pinned to what trained it (a local build tag like +cpu
    dropped: pip resolves the plain version from any index). Stated, not inferred: MLflow would
    load the model in a subprocess to find them."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "transformers", "pandas")]


def signature(kind: str):
    """classification: text -> label, score; causal_lm: prompt -> text (param max_new_tokens)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if kind == CAUSAL_LM:
        return ModelSignature(  # 64: lmforge/mlflow_model.py's MAX_NEW_TOKENS
            Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string", "text")]),
            ParamSchema([ParamSpec("max_new_tokens", "long", 64)]))
    return ModelSignature(Schema([ColSpec("string", "text")]),
                          Schema([ColSpec("string", "label"), ColSpec("double", "score")]))


def log_model(params: Params, model_dir: Path, examples: list[str], step: int = TRAINED) -> str:
    """Log ``model_dir`` into the active run as an MLflow pyfunc model (lmforge/mlflow_model.py),
    with its signature, ``examples`` as input example, and pinned requirements; returns its id.
    ``step`` tells train's model (TRAINED) from align's (ALIGNED) in the run's outputs.

    MLflow loads it once here, to check that the example predicts.
    """
    import tempfile

    import mlflow
    import pandas as pd

    prep, causal = params.prepare, params.task == CAUSAL_LM
    rows = prep.block_size if causal and not params.data.pairs else prep.max_length
    with tempfile.TemporaryDirectory() as tmp:
        settings = Path(tmp) / "settings.json"
        settings.write_text(json.dumps({"max_length": rows}))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(PYFUNC_CODE),
            artifacts={"model": str(model_dir), "settings": str(settings)},
            signature=signature(params.task),
            input_example=pd.DataFrame({"prompt" if causal else "text": examples}),
            pip_requirements=requirements(), step=step)
    return info.model_id


def dataset_source(source: str):
    """The MLflow dataset source of ``data.source``: a hub dataset, else the path as written."""
    if source.startswith("hf:"):
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        return HuggingFaceDatasetSource(path=source.removeprefix("hf:"))
    return source  # MLflow resolves a path to its local artifact source


def log_datasets(params: Params, frames: dict[str, object], source_sha256: str) -> None:
    """Each split (a DataFrame) as an input of the active run, named after the split.

    Its source is ``data.source`` and its digest the source's SHA-256 from ingest's manifest, cut
    to the 36 characters MLflow stores (the input's ``sha256`` tag holds it whole).
    """
    import warnings

    import mlflow

    source = dataset_source(params.data.source)
    for split, df in frames.items():
        targets = "label" if "label" in df.columns else None
        with warnings.catch_warnings():  # a plain path matches the "" and "file" schemes alike
            warnings.filterwarnings("ignore", ".*can be interpreted in multiple ways.*")
            dataset = mlflow.data.from_pandas(df, source=source, targets=targets, name=split,
                                              digest=source_sha256[:36])
        mlflow.log_input(dataset, context=DATASET_CONTEXT.get(split, split),
                         tags={"sha256": source_sha256})


def split_frames(processed: Path, meta: dict) -> dict:
    """What the run records of each split as an MLflow dataset: its texts and label names (or,
    for plain-text causal_lm, its token blocks), not the tokenized columns."""
    from datasets import load_from_disk

    frames = {}
    for name, split in load_from_disk(str(processed / "datasets")).items():
        if "id2label" in meta:  # classification: the text and a label id per row
            df = split.select_columns(["text", "labels"]).to_pandas()
            df["label"] = df.pop("labels").map(lambda i: meta["id2label"][str(i)])
        else:  # causal_lm: prompt and response, or plain text's token blocks
            texts = [c for c, f in split.features.items()
                     if getattr(f, "dtype", None) in ("string", "large_string")]
            df = split.select_columns(texts or ["input_ids"]).to_pandas()
        frames[name] = df
    return frames


def input_examples(train, tokenizer, n: int = 3) -> list[str]:
    """The logged model's input example: the first train texts (prompts), or the start of the
    first token blocks."""
    for column in ("text", "prompt"):
        if column in train:
            return train[column].head(n).tolist()
    return [tokenizer.decode(ids[:EXAMPLE_TOKENS]) for ids in train["input_ids"].head(n)]


def run_summary(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """metrics/train.json for the run: the saved model's validation scores as metrics (val/best_*,
    comparable across runs), how the run went (epochs, steps, wall_s...) as tags train.*."""
    scores, tags = {}, {}
    for key, value in metrics.items():
        if key.startswith("best_val_"):
            if value is not None:
                scores[f"val/best_{key.removeprefix('best_val_')}"] = value
        else:
            tags[f"train.{key}"] = str(value)
    return scores, tags


def log_to_run(params: Params, flat: dict[str, float], files: list[Path]) -> None:
    """Add test metrics (already flat, named test/...) and the written files to the run train
    started; the metrics are linked to the model train logged, so its page shows them too."""
    import mlflow

    with resume_run(params) as run:
        model_id = logged_model_id(mlflow.MlflowClient(), run.info.run_id)
        mlflow.log_metrics(flat, model_id=model_id)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluate")
