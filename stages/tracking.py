"""MLflow at the edges: train's main() opens the run, evaluate's main() reopens it by id.

One run per pipeline execution: the id travels in a small JSON file (``paths.run_info``) that is an
output of train and a dependency of evaluate. Library code never starts runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.common import read_json, write_json
from stages.params import Params, Tracking

SQLITE = "sqlite:///"


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

    if uri.startswith(SQLITE) and mlflow.get_experiment_by_name(name) is None:
        store = Path(uri.removeprefix(SQLITE))
        mlflow.create_experiment(name, artifact_location=str(store.parent / "mlruns" / name))
    mlflow.set_experiment(name)


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
    return tags


def flat_params(params: Params, sections: tuple[str, ...]) -> dict[str, str]:
    """The resolved params sections as dotted keys (MLflow params are flat strings)."""
    dumped = params.model_dump(mode="json", by_alias=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = str(node)

    for name in sections:
        walk(name, dumped[name])
    return flat


def start_run(params: Params, sections: tuple[str, ...], data_hash: str) -> str:
    """Open a new run (tags + resolved params), record its id in paths.run_info, return the id."""
    import mlflow

    uri = tracking_uri(params.tracking)
    mlflow.set_tracking_uri(uri)
    use_experiment(params.tracking.experiment, uri)
    with mlflow.start_run(tags=lineage_tags(data_hash)) as run:
        mlflow.log_params(flat_params(params, sections))
    # As configured, not resolved: a relative store stays relative to wherever the repo is cloned.
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "tracking_uri": configured_uri(params.tracking)}
    write_json(params.paths.run_info, info)
    return run.info.run_id


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
