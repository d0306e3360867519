"""Comparing runs: `dvc metrics/params/plots diff` across branches, `dvc exp run` (in the workspace
and queued), each experiment an MLflow run named after it; and the CI workflow's contract.

The end-to-end tests share one committed baseline on `main` (tiny BERT, 36 rows, one epoch) and each
works in its own copy of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.tasks import task
from tests.conftest import REPO
from tests.helpers import (
    dvc,
    dvc_ok,
    experiments,
    git,
    learning_rate,
    mlflow_client,
    set_params,
    tiny_repo,
    wait_for_queue,
)

# Up to gate: every metrics file dvc.yaml declares exists; package is covered by test_pipeline.
TARGET = "gate"
# Train's curves by file; evaluate's charts by name (dvc.yaml draws each from params.yaml `plots:`).
PLOTS = {"plots/train/loss.csv", "plots/train/val.csv", "confusion", "per_class"}
QUEUE_TIMEOUT_S = 420  # two queued runs take ~80 s on an idle 2-core machine


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny pipeline run up to TARGET, committed (dvc.lock, metrics, plots, params) on `main`."""
    repo = tiny_repo(tmp_path_factory.mktemp("baseline") / "repo", tiny_model_dir)
    dvc_ok(repo, "repro", TARGET)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    git(repo, "branch", "-M", "main")
    return repo


@pytest.fixture
def repo(baseline, tmp_path) -> Path:
    """A private copy of the baseline with an empty MLflow store.

    A copied store would log into the baseline's own mlruns/: MLflow records artifact folders as
    absolute paths.
    """
    repo = Path(shutil.copytree(baseline, tmp_path / "repo", symlinks=True))
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlruns", ignore_errors=True)
    return repo


@pytest.mark.slow
def test_metrics_params_and_plots_diff_against_main(repo, tmp_path):
    git(repo, "checkout", "-qb", "two-epochs")
    set_params(repo, train={"max_epochs": 2})  # an epoch is always 3 steps: steps surely change
    dvc_ok(repo, "repro", TARGET)

    everything = json.loads(dvc_ok(repo, "metrics", "diff", "main", "--all", "--json"))
    assert {"metrics/data.json", "metrics/validation.json", "metrics/train.json",
            "metrics/eval.json"} <= set(everything)
    assert {"accuracy", "f1_macro", "f1_weighted", "loss", "per_class.neutral.f1"} <= set(
        everything["metrics/eval.json"])
    steps, epochs = everything["metrics/train.json"]["steps"], everything["metrics/train.json"]["epochs"]
    assert steps["old"] == 3 and steps["new"] == 6 and steps["diff"] == 3  # 18 train rows, batch 8
    assert (epochs["old"], epochs["new"]) == (1, 2)
    # Same data: every manifest and validation value is equal (strings such as the source hash
    # carry no "diff"), and without --all neither file is listed at all.
    for name in ("metrics/data.json", "metrics/validation.json"):
        assert all(v["old"] == v["new"] and v.get("diff", 0) == 0 for v in everything[name].values())
    assert everything["metrics/data.json"]["source_sha256"]["old"]  # the hash is compared too
    changed = json.loads(dvc_ok(repo, "metrics", "diff", "main", "--json"))
    assert "metrics/data.json" not in changed and "metrics/validation.json" not in changed
    assert changed["metrics/train.json"]["steps"]["diff"] == 3

    params = json.loads(dvc_ok(repo, "params", "diff", "main", "--json"))
    assert params == {"params.yaml": {"train.max_epochs": {"old": 1, "new": 2, "diff": 1}}}

    diff = json.loads(dvc_ok(repo, "plots", "diff", "main", "--json"))
    plots = diff["data"]
    # causal_lm's chart is declared with no file for classification: empty, and no load error.
    assert PLOTS <= set(plots) and plots["perplexity"] == []
    assert not [e for e in diff.get("errors", []) if e.get("name") in PLOTS | {"perplexity"}]
    rows = {name: [row["rev"] for row in spec[0]["content"]["data"]["values"]]
            for name, spec in plots.items() if name in PLOTS}
    # One loss row per step (log_every_n_steps: 1), one confusion row per test example, per revision.
    loss = rows["plots/train/loss.csv"]
    assert (loss.count("main"), loss.count("workspace")) == (3, 6)
    assert rows["confusion"].count("main") == 9
    assert rows["confusion"].count("workspace") == 9
    assert rows["plots/train/val.csv"].count("workspace") == 2  # one validation row per epoch

    out = tmp_path / "dvc_plots"
    dvc_ok(repo, "plots", "diff", "main", "-o", str(out))
    html = (out / "index.html").read_text()
    assert all(name in html for name in PLOTS)


def mlflow_runs(repo: Path) -> dict[str, object]:
    """dvc.exp_name -> the MLflow run."""
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return {r.data.tags.get("dvc.exp_name"): r for r in runs}


def artifact_folders(repo: Path, run_id: str) -> set[str]:
    """Top-level artifact folders; empty when they were written to a folder that is gone."""
    return {a.path for a in mlflow_client(repo).list_artifacts(run_id)}


@pytest.mark.slow
def test_experiments_in_workspace_and_queue_are_dvc_experiments_and_mlflow_runs(repo):
    head = git(repo, "rev-parse", "HEAD")
    manifest = json.loads((repo / "metrics/data.json").read_text())

    # In the workspace: stages run in the repo itself, MLflow writes to its mlflow.db.
    dvc_ok(repo, "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.002", TARGET)
    exp = experiments(repo)["lr-high"]
    assert learning_rate(exp) == 0.002
    assert {"accuracy", "f1_macro", "loss"} <= set(exp["metrics"]["metrics/eval.json"]["data"])
    run = mlflow_runs(repo)["lr-high"]
    assert run.data.tags["dvc.baseline_rev"] == head
    assert run.data.tags["data.sha256"] == manifest["source_sha256"]
    assert run.data.params["train.learning_rate"] == "0.002"
    assert "test/accuracy" in run.data.metrics  # evaluate reopened the same run
    assert {"evaluate", "plots"} <= artifact_folders(repo, run.info.run_id)

    # A queued grid: each runs in a temp copy under .dvc/tmp/exps, one at a time.
    queued = dvc_ok(repo, "exp", "run", "--queue", "-S", "train.learning_rate=0.001,0.003", TARGET)
    assert queued.count("Queued experiment") == 2
    try:
        dvc_ok(repo, "queue", "start")
        status = wait_for_queue(repo, QUEUE_TIMEOUT_S)
    finally:
        dvc(repo, "queue", "stop", "--kill")  # never leave a worker behind, even on a timeout
    assert status.count("Success") == 2, status
    names = {learning_rate(data): name for name, data in experiments(repo).items()}
    assert set(names) == {0.001, 0.002, 0.003}

    # `lmforge exp`: one row each, the learning rate and the headline test metrics beside it.
    table = subprocess.run([str(Path(sys.executable).parent / "lmforge"), "exp"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    columns = table[0].split()
    assert columns[:3] == ["experiment", "task", "train.learning_rate"]
    assert columns[-2:] == list(task("classification").headline)  # no state: every run finished
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert {"workspace", "main", *names.values()} == set(rows)
    for lr, name in names.items():
        assert float(rows[name][2]) == lr and rows[name][-1] != "-"

    runs = mlflow_runs(repo)
    # A queued run works in a temp copy, deleted afterwards: tracking_uri resolves the relative
    # sqlite store against $DVC_ROOT (the queue's own repo), so the runs land here.
    missing = [names[lr] for lr in (0.001, 0.003) if names[lr] not in runs]
    assert not missing, f"queued experiments {missing} lost their MLflow runs"
    for lr in (0.001, 0.003):
        run = runs[names[lr]]
        assert run.data.params["train.learning_rate"] == str(lr)
        assert run.data.tags["dvc.baseline_rev"] == head
        assert "test/accuracy" in run.data.metrics
        assert {"evaluate", "plots"} <= artifact_folders(repo, run.info.run_id)


WORKFLOW = REPO / ".github/workflows/pr.yml"


def steps_by_name(job: dict) -> dict[str, dict]:
    return {step.get("name", step.get("uses", "")): step for step in job["steps"]}


def test_pr_workflow_reproduces_tests_gates_and_comments():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    assert workflow["permissions"]["pull-requests"] == "write"  # the comment step needs it
    jobs = workflow["jobs"]
    for job in jobs.values():
        steps = steps_by_name(job)
        checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
        assert checkout["with"]["fetch-depth"] == 0  # the base branch must exist for the diffs
        python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
        assert str(python["with"]["python-version"]) == "3.11" and python["with"]["cache"] == "pip"
        assert "make setup" in steps["Set up the venv"]["run"]
    assert "make test" in steps_by_name(jobs["test"])["Tests"]["run"]

    gate = steps_by_name(jobs["gate"])
    assert "dvc repro" in gate["Reproduce the pipeline"]["run"]
    report = load_gate_report_path()
    check = gate["Gate against the base branch"]
    assert f"lmforge compare --against origin/${{{{ github.base_ref }}}} --report {report}" in check["run"]
    assert check["continue-on-error"] is True and check["id"] == "gate"
    comment = gate["Comment the report on the pull request"]
    assert comment["if"].startswith("always()") and comment["with"]["path"] == report
    assert "steps.gate.outcome == 'failure'" in gate["Fail when the gate failed"]["if"]
    cached = [s["with"]["path"] for s in jobs["gate"]["steps"] if "actions/cache" in s.get("uses", "")]
    assert ".dvc/cache" in cached


def load_gate_report_path() -> str:
    from lmforge.params import load_params

    return str(load_params(REPO / "params.yaml").paths.gate_report)
