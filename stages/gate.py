"""Stage gate: absolute floors on the test metrics; the model is registered in MLflow with an alias
saying whether it passed.

    python -m stages.gate      # normally via `dvc repro gate`; reads `gate` and `paths`

Every key of ``gate.floors`` is a dotted path into ``paths.eval_metrics`` (``accuracy``,
``per_class.negative.f1``) with a ``min``, a ``max`` or both. The verdict goes to ``paths.gate`` (a
DVC metric: numbers and booleans only) and, as tag ``gate.passed`` (true/false), to the pipeline's
MLflow run. When ``gate.registered_model`` is set, the MLflow model train logged into the run
becomes a version of that registered model, tagged with the run's lineage and the test metrics,
with alias ``champion`` when every floor holds and ``candidate`` when one does not; gating the same
run again reuses its version. A failed floor exits 2 after writing the verdict, so `dvc repro`
stops before package.

    mlflow.pyfunc.load_model("models:/lmforge-classifier@champion")   # the newest passing model
"""

from __future__ import annotations

from lmforge import tracking
from lmforge.common import UserError, is_number, read_json, run_main, write_json
from lmforge.params import Floor, Params, load_params

# Run tags that say where a model comes from, copied onto its registry version: run tag -> version
# tag (a version has no source tags of its own, so the commit and branch get plain names there).
LINEAGE_TAGS = {tracking.GIT_COMMIT: "git.commit", tracking.GIT_BRANCH: "git.branch",
                "git.dirty": "git.dirty", "data.sha256": "data.sha256", "dvc.exp_name": "dvc.exp_name"}
CHAMPION, CANDIDATE = "champion", "candidate"  # registry aliases: passed the floors, or not


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
    tags = {mine: run_tags[theirs] for theirs, mine in LINEAGE_TAGS.items() if theirs in run_tags}
    tags |= {f"test_{k}": str(v) for k, v in metrics.items() if is_number(v)}
    return tags


def create_registered_model(client, name: str) -> None:
    """Create `name`; one created by another gate meanwhile (a parallel queue worker) is as good."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="lmforge models, gated by gate.floors: "
                                       "@champion passed them, @candidate did not")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_of(client, name: str, run_id: str, model_id: str, tags: dict[str, str]) -> int:
    """The version of `name` made from the run's logged model (models:/<id>), created the first
    time: one version per trained (or aligned) model, however often it is gated."""
    from mlflow.exceptions import MlflowException

    existing = [v for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
                if v.source == f"models:/{model_id}"]
    if existing:
        return max(int(v.version) for v in existing)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        create_registered_model(client, name)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                          tags=tags, model_id=model_id)
    return int(version.version)  # a str from a tracking server, an int from a sqlite store


def set_alias(client, name: str, alias: str, version: int, attempts: int = 5) -> None:
    """Point `alias` at `version`. MLflow's SQL store sets an alias by look-up then insert, so two
    gates setting the same new alias at once (a parallel queue) collide on the table's unique key;
    the loser's retry finds the row and moves it: the last gate to finish holds the alias."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as err:
            collided = "UNIQUE constraint" in str(err) or "duplicate key" in str(err)  # sqlite, postgres
            if not collided or attempt == attempts - 1:
                raise


def register(client, name: str, run_id: str, tags: dict[str, str], passed: bool,
             aligned: bool = False) -> int | None:
    """Register the model train (``aligned``: align) logged into the run and point an alias at
    it: ``champion`` when it passed the floors, ``candidate`` when it did not (champion stays where
    it was). Returns the version; None when a failed run logged no model (the floors' failure is
    the message)."""
    step, stage = (tracking.ALIGNED, "align") if aligned else (tracking.TRAINED, "train")
    model_id = tracking.logged_model_id(client, run_id, step)
    if model_id is None:
        if not passed:
            return None
        raise UserError(f"MLflow run {run_id} holds no model logged by {stage} to register: set "
                        f"tracking.log_model: true and rerun {stage}, or gate.registered_model: null")
    version = version_of(client, name, run_id, model_id, tags)
    client.set_model_version_tag(name, str(version), "gate.passed", str(passed).lower())
    set_alias(client, name, CHAMPION if passed else CANDIDATE, version)
    if passed and CANDIDATE in client.get_model_version(name, str(version)).aliases:
        client.delete_registered_model_alias(name, CANDIDATE)  # failed once, passes now
    return version


def record_in_mlflow(params: Params, verdict: dict, metrics: dict) -> int | None:
    """Tag the pipeline's run with the verdict (gate.passed) and register its model (see
    register) unless gate.registered_model is null. Returns the version."""
    import mlflow

    name = params.gate.registered_model
    with tracking.resume_run(params) as run:
        mlflow.set_tag("gate.passed", str(verdict["passed"]).lower())
        if name is None:
            return None
        client = mlflow.MlflowClient(tracking.tracking_uri(params.tracking))
        tags = version_tags(run.data.tags, metrics)
        # Evaluate scored align's model when it wrote one: that model is the one to register.
        return register(client, name, run.info.run_id, tags, verdict["passed"],
                        aligned="align" in metrics)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    tracking.run_id(paths.run_info)  # fail early, with the stage to run, when train never ran
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate` first")
    verdict = check_floors(metrics, params.gate.floors)
    version = record_in_mlflow(params, verdict, metrics)
    verdict["registered_version"] = version
    write_json(paths.gate, verdict)
    alias = CHAMPION if verdict["passed"] else CANDIDATE
    where = f"{params.gate.registered_model} v{version} @{alias}" if version else ""
    if not verdict["passed"]:
        raise UserError(failure_summary(verdict["checks"], str(paths.eval_metrics))
                        + (f"\n(registered as {where}, not as champion)" if where else ""))
    print(f"gate: {len(verdict['checks'])} floor(s) passed{', registered ' + where if where else ''}"
          f" -> {paths.gate}")
    return verdict


if __name__ == "__main__":
    run_main(main)
