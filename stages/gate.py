"""Stage gate: absolute floors on the test metrics; a model inside them is registered in MLflow.

    python -m stages.gate      # normally via `dvc repro gate`; reads `gate` and `paths`

Every key of ``gate.floors`` is a dotted path into ``paths.eval_metrics`` (``accuracy``,
``per_class.negative.f1``) with a ``min``, a ``max`` or both. The verdict goes to ``paths.gate`` (a
DVC metric: numbers and booleans only) and, as metric ``gate_passed`` (1/0), to the pipeline's
MLflow run. A failed floor exits 2 after writing the verdict, so `dvc repro` stops before package
and nothing is registered. When every floor holds and ``gate.registered_model`` is set, the model
folder train logged to the run (artifact path ``model``) becomes a version of that registered
model, tagged with the run's lineage and the test metrics; gating the same run again reuses its
version instead of adding a duplicate.
"""

from __future__ import annotations

from lmforge import tracking
from lmforge.common import UserError, is_number, read_json, run_main, write_json
from lmforge.params import Floor, Params, load_params

# Run tags that say where a model comes from; copied onto its registry version.
LINEAGE_TAGS = ("git.commit", "git.branch", "git.dirty", "data.sha256", "dvc.exp_name")


def flatten(metrics: dict, prefix: str = "") -> dict[str, object]:
    """Nested metrics as dotted keys, as DVC names them (``per_class.negative.f1``)."""
    flat: dict[str, object] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def check_floor(value: object, floor: Floor) -> dict:
    """One check: the value, its bounds, and whether it is inside them (a missing value is not)."""
    value = value if is_number(value) else None
    check: dict = {"value": value}
    if floor.min is not None:
        check["min"] = floor.min
    if floor.max is not None:
        check["max"] = floor.max
    inside = value is not None and (floor.min is None or value >= floor.min) and (
        floor.max is None or value <= floor.max)
    check["passed"] = inside
    return check


def check_floors(metrics: dict, floors: dict[str, Floor]) -> dict:
    """The verdict written to paths.gate: passed, how many checks failed, every check."""
    flat = flatten(metrics)
    checks = {key: check_floor(flat.get(key), floor) for key, floor in floors.items()}
    failed = sum(not c["passed"] for c in checks.values())
    return {"passed": failed == 0, "failed": failed, "checks": checks}


def failure_summary(checks: dict, source: str) -> str:
    """One line per failed check, naming the metric, its value and the bound it broke."""
    lines = []
    for key, c in checks.items():
        if c["passed"]:
            continue
        if c["value"] is None:
            lines.append(f"  {key}: not a number in {source} (misspelled key, or a stale file)")
        elif "min" in c and c["value"] < c["min"]:
            lines.append(f"  {key} = {c['value']:g}, below min {c['min']:g}")
        else:
            lines.append(f"  {key} = {c['value']:g}, above max {c['max']:g}")
    return f"{len(lines)} floor(s) failed (gate.floors):\n" + "\n".join(lines)


def version_tags(run_tags: dict[str, str], metrics: dict) -> dict[str, str]:
    """Registry version tags: the run's lineage plus every top-level test metric (test_accuracy...)."""
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags |= {f"test_{k}": str(v) for k, v in metrics.items() if is_number(v)}
    return tags


def create_registered_model(client, name: str) -> None:
    """Create `name`; one created by another gate meanwhile (a parallel queue worker) is as good."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="lmforge models that passed gate.floors")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register(client, name: str, run_id: str, tags: dict[str, str]) -> int:
    """A version of `name` for the run's logged model folder; the run's existing version if any."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if not client.list_artifacts(run_id, "model"):
        raise UserError(f"MLflow run {run_id} holds no model artifacts to register: set "
                        "tracking.log_model: true and rerun train, or gate.registered_model: null")
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:  # the same model gated again (a floor changed): one version per trained model
        return max(int(v.version) for v in existing)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        create_registered_model(client, name)
    # The real location (a path, s3://, mlflow-artifacts:/), not runs:/: a tracking server accepts
    # it when it lies inside the run's artifact root, and it stays valid for any registry client.
    source = RunsArtifactRepository.get_underlying_uri(f"runs:/{run_id}/model")
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return int(version.version)  # a str from a tracking server, an int from a sqlite store


def record_in_mlflow(params: Params, verdict: dict, metrics: dict) -> int | None:
    """Log gate_passed to the pipeline's run; register the model when it passed. Returns the version."""
    import mlflow

    name = params.gate.registered_model
    with tracking.resume_run(params) as run:
        mlflow.log_metric("gate_passed", int(verdict["passed"]))
        if not verdict["passed"] or name is None:
            return None
        client = mlflow.MlflowClient(tracking.tracking_uri(params.tracking))
        tags = version_tags(run.data.tags, metrics)
        return register(client, name, run.info.run_id, tags)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    tracking.run_id(paths.run_info)  # fail early, with the stage to run, when train never ran
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate` first")
    verdict = check_floors(metrics, params.gate.floors)
    if not verdict["passed"]:
        write_json(paths.gate, {**verdict, "registered_version": None})
        record_in_mlflow(params, verdict, metrics)
        raise UserError(failure_summary(verdict["checks"], str(paths.eval_metrics)))
    version = record_in_mlflow(params, verdict, metrics)
    verdict["registered_version"] = version
    write_json(paths.gate, verdict)
    where = f", registered {params.gate.registered_model} v{version}" if version else ""
    print(f"gate: {len(verdict['checks'])} floor(s) passed{where} -> {paths.gate}")
    return verdict


if __name__ == "__main__":
    run_main(main)
