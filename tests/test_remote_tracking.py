"""Tracking against a real `mlflow server` on 127.0.0.1: train, evaluate and gate log there, not locally.

MLFLOW_TRACKING_URI points at the server while params keep a sqlite `tracking.uri`: the environment
must win, and every param, metric, tag, artifact and registry version must land on the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import lineage
from lmforge.common import read_json, write_json
from lmforge.params import Floor
from stages import evaluate, gate, train
from tests.conftest import start_process_group, stop_process_group
from tests.helpers import free_port, git_commit, wait_healthy

DATA_SHA = "5e" * 32


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server with a sqlite backend that proxies artifacts: (url, its storage folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The job runner (8 huey processes, +6 s of start-up) serves features no stage uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "server.log"
    with log.open("w") as out:
        # Its own session: the server and its uvicorn worker are stopped together.
        proc = start_process_group(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        startup_s = wait_healthy(f"{url}/health", proc, log, what="mlflow server")
        print(f"\nmlflow server healthy after {startup_s:.1f} s")
        yield url, root
    finally:
        stop_process_group(proc)


@pytest.fixture
def remote(mlflow_server, monkeypatch):
    """The server's URL in MLFLOW_TRACKING_URI; MLflow's process-wide URI is reset afterwards."""
    import mlflow

    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    yield mlflow_server
    mlflow.set_tracking_uri(None)  # the stages set it; later tests must not inherit a dead server


def test_train_evaluate_and_gate_log_to_the_server_only(prepared_params, remote, tmp_path):
    from mlflow import MlflowClient

    url, server_root = remote
    params = prepared_params
    assert params.tracking.uri.startswith("sqlite:///")  # overridden by the environment
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})  # ingest's, for the run's tags
    head = git_commit(tmp_path)  # the cwd: the commit the run is tagged with
    train.main(params)
    scores = evaluate.main(params)
    assert (params.paths.eval_reports / "misclassified.csv").is_file()  # logged below, kept locally
    info = read_json(params.paths.run_info, "")
    assert info["tracking_uri"] == url

    client = MlflowClient(url)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.params["model.source"] == params.model.source
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 4  # 2 epochs x 2 steps
    assert run.data.metrics["test/accuracy"] == pytest.approx(scores["accuracy"])
    assert run.data.tags["data.sha256"] == DATA_SHA
    assert run.data.tags["mlflow.source.git.commit"] == head and run.data.tags["git.dirty"] == "false"

    # Artifacts went through the server's proxy into its own folder.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {top: {Path(f.path).name for f in client.list_artifacts(run.info.run_id, top)}
              for top in ("plots", "evaluate")}
    (output,) = run.outputs.model_outputs  # the MLflow model, its folder among its artifacts
    model_files = {Path(f.path).name for f in client.list_logged_model_artifacts(
        output.model_id, "artifacts/model")}
    assert {"config.json", "model.safetensors", "labels.json"} <= model_files
    assert {"loss.csv", "val.csv"} <= listed["plots"]
    assert {"eval.json", "confusion.csv", "per_class.csv", "misclassified.csv"} <= listed["evaluate"]
    stored = {p.name for p in (server_root / "artifacts").rglob("*") if p.is_file()}
    assert {"model.safetensors", "eval.json", "loss.csv"} <= stored

    # The gate registers the run's model in the server's registry.
    gated = params.model_copy(update={"gate": params.gate.model_copy(
        update={"floors": {"accuracy": Floor(min=0.0)}})})  # a tiny model: any score passes
    verdict = gate.main(gated)
    version = client.get_model_version(params.gate.registered_model,
                                       str(verdict["registered_version"]))
    assert version.run_id == run.info.run_id and version.aliases == ["champion"]
    assert version.source == f"models:/{output.model_id}"
    assert version.tags["data.sha256"] == DATA_SHA and "test_accuracy" in version.tags

    # `lmforge lineage` reads the run back from the server that run.json names.
    facts = lineage.collect(params)
    assert facts["mlflow"]["status"] == "FINISHED" and facts["mlflow"]["tracking_uri"] == url
    assert facts["mlflow"]["test_accuracy"] == pytest.approx(scores["accuracy"])
    assert facts["gate"]["registered_version"] == verdict["registered_version"]

    # Nothing was tracked locally: no sqlite store, no file store, no artifact folder.
    local = [p for p in tmp_path.rglob("*") if p.suffix == ".db" or p.name in ("mlruns", "mlartifacts")]
    assert local == []
