"""Two queued experiments at once (`dvc queue start -j 2`) writing one sqlite MLflow store.

Both must finish, and both must be in the store complete: params, every per-step loss (Lightning
logs them from a background thread), the test metrics, the gate verdict, the artifacts and a
registry version each. The store starts empty, the worst case: both workers create the tables,
the experiment and the registered model at about the same time.

The first tests race the same first writes directly, with processes released together, which hits
the window every time instead of by chance.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import (
    dvc,
    dvc_ok,
    experiments,
    git,
    learning_rate,
    mlflow_client,
    tiny_repo,
    wait_for_queue,
)

WORKERS = 4  # processes racing the first writes; more than -j 2 so the window is surely hit
QUEUE_TIMEOUT_S = 420  # two tiny experiments side by side: ~95 s on a busy 2-core machine
LEARNING_RATES = (0.002, 0.003)  # both differ from the baseline (0.001): DVC skips an equal one
REGISTERED = "lmforge-classifier"


def _open_run(barrier, store: str, name: str, queue) -> None:
    """One worker: wait for the others, then open a run in a store nobody has created yet."""
    try:
        from lmforge import tracking
        from lmforge.params import parse_params

        params = parse_params({"tracking": {"uri": f"sqlite:///{store}"},
                               "paths": {"run_info": str(Path(store).parent / f"{name}.json")}})
        barrier.wait(timeout=60)
        queue.put((name, tracking.start_run(params, ("train",), "f" * 64)))
    except BaseException as err:  # noqa: BLE001 - the parent reports what went wrong, and where
        queue.put((name, f"ERROR {type(err).__name__}: {err}"))


def _register(barrier, store: str, run_id: str, queue) -> None:
    """One worker: register its run's model under the shared name, as gate does."""
    try:
        import mlflow

        from stages.gate import register

        uri = f"sqlite:///{store}"
        mlflow.set_tracking_uri(uri)  # as gate's resume_run does: models:/ URIs resolve against it
        barrier.wait(timeout=60)
        queue.put((run_id, register(mlflow.MlflowClient(uri), REGISTERED, run_id, {}, True)))
    except BaseException as err:  # noqa: BLE001
        queue.put((run_id, f"ERROR {type(err).__name__}: {err}"))


def race(target, args: list[tuple]) -> dict:
    """Start one process per args tuple, release them together, return {key: result}."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as DVC's workers are
    barrier, queue = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, *a, queue)) for a in args]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    errors = {k: v for k, v in results.items() if isinstance(v, str) and v.startswith("ERROR")}
    assert not errors, f"{len(errors)} of {len(procs)} concurrent writers failed: {errors}"
    return results


@pytest.mark.slow
def test_concurrent_first_runs_in_an_empty_sqlite_store_all_land(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    runs = race(_open_run, [(str(store), f"w{i}") for i in range(WORKERS)])

    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("lmforge")
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted(runs.values())
    assert all(r.data.params["train.learning_rate"] for r in found)
    # The one experiment every worker picked keeps its artifacts beside the store.
    assert experiment.artifact_location.endswith(str(tmp_path / "mlruns" / "lmforge"))

    # Then every run's model is registered at once under one name: one version each.
    from mlflow.entities import LoggedModelOutput

    for run_id in runs.values():  # as train leaves it: a model logged into the run
        model = client.create_logged_model(experiment.experiment_id, source_run_id=run_id)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    versions = race(_register, [(str(store), run_id) for run_id in runs.values()])
    assert sorted(versions.values()) == list(range(1, WORKERS + 1))
    listed = client.search_model_versions(f"name='{REGISTERED}'")
    assert sorted(v.run_id for v in listed) == sorted(runs.values())
    # All passed, all set @champion at once: it ends on exactly one of them.
    assert client.get_registered_model(REGISTERED).aliases["champion"] in {
        v.version for v in listed}


def test_gate_that_loses_the_race_to_create_the_registered_model_still_registers(
        tmp_path, monkeypatch):
    """Two gates both find no registered model, both create it: the second must carry on."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from stages.gate import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # as gate's resume_run does: models:/ URIs resolve against it
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("lmforge")
    run = client.create_run(experiment)
    model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step=0)])  # as train
    client.create_registered_model(REGISTERED)  # the other gate, a moment after our look-up

    real, looked = client.get_registered_model, []

    def not_yet(name):  # what this gate's look-up saw before the other one created it
        if looked:  # MLflow's own later calls (a tag, an alias) see the store as it is
            return real(name)
        looked.append(name)
        raise MlflowException(f"Registered Model with name={name} not found",
                              error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(client, "get_registered_model", not_yet)
    assert register(client, REGISTERED, run.info.run_id, {}, passed=True) == 1
    assert [v.run_id for v in client.search_model_versions(f"name='{REGISTERED}'")] == [
        run.info.run_id]


@pytest.fixture
def baseline(tmp_path, tiny_model_dir) -> Path:
    """The tiny pipeline up to gate, committed on `main`, with an empty MLflow store."""
    repo = tiny_repo(tmp_path / "repo", tiny_model_dir)
    dvc_ok(repo, "repro", "gate")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    git(repo, "branch", "-M", "main")
    (repo / "mlflow.db").unlink()  # the queued runs must create the store: the worst case
    shutil.rmtree(repo / "mlruns", ignore_errors=True)
    return repo


@pytest.mark.slow
def test_two_queue_workers_both_finish_and_both_land_complete_in_mlflow(baseline):
    repo = baseline
    grid = ",".join(map(str, LEARNING_RATES))
    queued = dvc_ok(repo, "exp", "run", "--queue", "-S", f"train.learning_rate={grid}", "gate")
    assert queued.count("Queued experiment") == 2
    started = time.monotonic()
    try:
        dvc_ok(repo, "queue", "start", "-j", "2")
        status = wait_for_queue(repo, QUEUE_TIMEOUT_S)
    finally:
        dvc(repo, "queue", "stop", "--kill")  # never leave a worker behind, even on a timeout
    print(f"two experiments side by side: {time.monotonic() - started:.0f} s")
    failed = [dvc(repo, "queue", "logs", name).stdout[-3000:] for name in failed_names(status)]
    assert status.count("Success") == 2, f"{status}\n" + "\n".join(failed)

    exps = {learning_rate(data): (name, data) for name, data in experiments(repo).items()}
    assert set(exps) == set(LEARNING_RATES)
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("lmforge")
    runs = {r.data.tags.get("dvc.exp_name"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {name for name, _ in exps.values()}, "one MLflow run per experiment"
    for lr, (name, data) in exps.items():
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.params["train.learning_rate"] == str(lr)
        steps = data["metrics"]["metrics/train.json"]["data"]["steps"]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(steps)), f"{name}: lost losses"
        assert "test/accuracy" in run.data.metrics and run.data.tags["gate.passed"] == "true"
        folders = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"plots", "evaluate"} <= folders, f"{name}: artifacts {folders}"
        assert len(run.outputs.model_outputs) == 1, f"{name}: no logged model"
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())


def failed_names(status: str) -> list[str]:
    """Experiment names on the `dvc queue status` lines that did not succeed."""
    return [line.split()[1] for line in status.splitlines()[1:]
            if line.split() and "Success" not in line and len(line.split()) > 1]


def test_gate_that_loses_the_race_to_set_an_alias_moves_it(tmp_path):
    """MLflow's SQL store inserts a new alias after looking it up; a gate that loses that race gets
    the unique-key error and must retry (the second time the row exists and moves)."""
    from mlflow.exceptions import MlflowException

    from stages.gate import set_alias

    calls = []

    class Client:  # the store as a racing gate sees it: the first insert collides
        def set_registered_model_alias(self, name, alias, version):
            calls.append((name, alias, version))
            if len(calls) == 1:
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                      "registered_model_aliases.name, registered_model_aliases.alias")

    set_alias(Client(), REGISTERED, "champion", 3)
    assert calls == [(REGISTERED, "champion", "3")] * 2

    class Broken:  # any other error is the user's to see, at once
        def set_registered_model_alias(self, name, alias, version):
            calls.append(alias)
            raise MlflowException("Registered model version 3 not found")

    calls.clear()
    with pytest.raises(MlflowException, match="not found"):
        set_alias(Broken(), REGISTERED, "champion", 3)
    assert calls == ["champion"]
