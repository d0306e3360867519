"""`lmforge lineage`: where the current model comes from, and whether the model store agrees.

    lmforge lineage            # a table: git, params, data, validation, gate, MLflow run, Bento
    lmforge lineage --json     # the same facts as JSON

Run from the repo root. Reads params.yaml and the pipeline's files (``paths.manifest``,
``paths.validation``, ``paths.gate``, ``paths.run_info``, ``paths.bento_info``), asks the MLflow run
and the BentoML store when they answer, and checks that the packaged model carries the run id, data
hash and params hash of the workspace. Exits 1 on any MISMATCH. A file that is missing is reported
as not produced yet, with the stage that writes it.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lmforge.common import UserError
from lmforge.params import Params, load_params
from lmforge.tasks import CLASSIFICATION, task
from lmforge.tracking import GIT_COMMIT, REDACTED, git_state, own_files, params_hash, redact_uri

CHECKED = ("mlflow_run_id", "data_sha256", "params_sha256")  # model labels compared to the workspace


def not_produced(stage: str) -> str:
    return f"not produced yet (run `dvc repro {stage}`)"


def read_optional(path: Path) -> dict | None:
    """An artifact of an earlier stage, or None when that stage has not run."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun the stage that writes it") from None


def validation_verdict(report: dict) -> dict:
    return {"passed": report.get("success"), "checks_failed": report.get("checks_failed")}


def gate_verdict(report: dict) -> dict:
    """The gate's verdict, its failed-floor count and registry version; the checks stay in the file."""
    return {k: report.get(k) for k in ("passed", "failed", "registered_version")}


def unreachable(uri: str) -> str | None:
    """Why the MLflow store cannot be read without side effects, or None when it can be tried.

    MLflow creates a missing sqlite file, and retries a dead server for minutes: both are checked
    here first, so a look at lineage neither writes nor hangs.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return None if db.is_file() else f"no such file: {db}"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3) as resp:
                return None if resp.status == 200 else f"/health answered {resp.status}"
        except OSError as err:  # refused, timed out, HTTP error
            return str(err)
    if uri.startswith("file://") or "://" not in uri:  # a local mlruns folder
        local = Path(uri.removeprefix("file://"))
        return None if local.exists() else f"no such folder: {local}"
    return None


def mlflow_facts(run_info: dict, default_uri: str, kind: str = CLASSIFICATION) -> dict:
    """The run id and store from run.json, plus the run's status, test metrics and lineage tags."""
    shown = run_info.get("tracking_uri") or default_uri  # where train logged, not where we'd log now
    # run.json holds the URI with its password redacted: connect with the configured one when it
    # is the same store.
    uri = default_uri if REDACTED in shown and redact_uri(default_uri) == shown else shown
    facts = {"run_id": run_info.get("run_id"), "tracking_uri": redact_uri(shown)}
    why = unreachable(uri)
    if why:
        return facts | {"status": f"unreachable ({why})"}
    from mlflow import MlflowClient

    try:
        run = MlflowClient(uri).get_run(facts["run_id"])
    except Exception as err:  # lineage reports a broken store; it is never the thing that crashes
        return facts | {"status": f"not found ({str(err).splitlines()[0][:200]})"}
    return facts | {
        "status": run.info.status,
        **{f"test_{k}": run.data.metrics.get(f"test/{k}") for k in task(kind).headline},
        "data_sha256": run.data.tags.get("data.sha256"),
        "git_commit": run.data.tags.get(GIT_COMMIT),
    }


def store_facts(bento_info: dict) -> dict:
    """The tags from bento.json, whether the BentoML store holds them, and the model's labels."""
    import bentoml
    from bentoml.exceptions import NotFound

    facts = {"bento_tag": bento_info.get("bento_tag"), "model_tag": bento_info.get("model_tag")}
    try:
        bentoml.get(facts["bento_tag"])
        facts["bento_in_store"] = True
    except (NotFound, ValueError):  # ValueError: a malformed tag
        facts["bento_in_store"] = False
    try:
        facts["model_labels"] = dict(bentoml.models.get(facts["model_tag"]).info.labels)
    except (NotFound, ValueError):
        facts["model_labels"] = None
    return facts


def consistency(workspace: dict, labels: dict | None) -> dict:
    """Per CHECKED field: MATCH / MISMATCH between workspace and model labels, or not found."""
    out = {}
    for field in CHECKED:
        mine, stored = workspace.get(field), (labels or {}).get(field)
        verdict = "not found" if mine is None or stored is None else (
            "MATCH" if mine == stored else "MISMATCH")
        out[field] = {"verdict": verdict, "workspace": mine, "store": stored}
    return out


def collect(params: Params) -> dict:
    """Every lineage fact as one JSON-ready dict; a missing artifact becomes a not-produced line."""
    paths = params.paths
    manifest, run_info = read_optional(paths.manifest), read_optional(paths.run_info)
    validation, gate = read_optional(paths.validation), read_optional(paths.gate)
    bento_info = read_optional(paths.bento_info)
    git = git_state(own_files(paths))
    report = {
        "workspace": {"task": params.task, "git_commit": git["commit"], "git_branch": git["branch"],
                      "git_dirty": git["dirty"] == "true", "params_sha256": params_hash(params)},
        "data": {"sha256": manifest.get("source_sha256")} if manifest else not_produced("ingest"),
        "validation": validation_verdict(validation) if validation else not_produced("validate"),
        "gate": gate_verdict(gate) if gate else not_produced("gate"),
        "mlflow": (mlflow_facts(run_info, params.tracking.uri, params.task) if run_info
                   else not_produced("train")),
        "bento": store_facts(bento_info) if bento_info else not_produced("package"),
    }
    mine = {"mlflow_run_id": (run_info or {}).get("run_id"),
            "data_sha256": (manifest or {}).get("source_sha256"),
            "params_sha256": report["workspace"]["params_sha256"]}
    labels = report["bento"].get("model_labels") if bento_info else None
    report["consistency"] = consistency(mine, labels)
    return report


def show(value: object) -> str:
    if isinstance(value, dict) and "verdict" in value:
        if value["verdict"] == "MATCH":
            return "MATCH"
        return f"{value['verdict']} (workspace: {value['workspace']}, store: {value['store']})"
    return "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def render(report: dict) -> str:
    """A two-level table: section, field, value; nested dicts (model labels) get a row per key."""
    lines = []
    for section, body in report.items():
        rows = body.items() if isinstance(body, dict) else [("", body)]
        for i, (key, value) in enumerate(rows):
            head = section if i == 0 else ""
            if isinstance(value, dict) and "verdict" not in value:
                lines += [f"{head:<12} {key + '.' + k:<34} {show(v)}" for k, v in value.items()]
            else:
                lines.append(f"{head:<12} {key:<34} {show(value)}".rstrip())
    return "\n".join(lines)


def has_mismatch(report: dict) -> bool:
    return any(c["verdict"] == "MISMATCH" for c in report["consistency"].values())


def run(args) -> int:
    """`lmforge lineage [--json]`: print the report; 1 when the store disagrees with the workspace."""
    report = collect(load_params())
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if has_mismatch(report) else 0
