"""End to end: `dvc repro` in a copy of the repo on tiny params, then bad data that validate must stop."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import make_rows
from tests.helpers import copy_repo, dvc, serving, set_params, tiny_repo

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path, tiny_model_dir) -> Path:
    repo = copy_repo(tmp_path / "repo")
    set_params(repo, model={"source": str(tiny_model_dir)}, prepare={"max_length": 32})
    return repo


def test_repro_runs_the_data_stages_then_stops_on_bad_data(repo):
    run = dvc(repo, "repro", "prepare")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((repo / "metrics/data.json").read_text())
    assert manifest["rows"]["total"] > 1000 and manifest["dropped"]["source"]["duplicate"] > 0
    verdict = json.loads((repo / "metrics/validation.json").read_text())
    assert verdict["success"] is True
    assert (repo / "reports/validation/index.html").exists()
    assert (repo / "data/processed/datasets/train").is_dir()
    assert set(json.loads((repo / "data/processed/labels.json").read_text())["label2id"]) == {
        "negative", "neutral", "positive"}
    assert "up to date" in dvc(repo, "repro", "prepare").stdout  # nothing changed, nothing re-runs

    processed_before = (repo / "data/processed/stats.json").read_bytes()
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]

    # Bad data: null and unknown labels in train, and test rows copied from train (leakage).
    bad = repo / "data/bad"
    bad.mkdir()
    rows = make_rows(n_per_class=12, seed=1)
    train = pd.concat([rows, pd.DataFrame({
        "text": ["a label went missing", "nobody knows", "strange one", "odd one"],
        "label": [None, None, "bogus", "bogus"],
    })])
    train.to_csv(bad / "train.csv", index=False)
    pd.concat([rows.iloc[:3], make_rows(2, seed=2)]).to_csv(bad / "test.csv", index=False)
    set_params(repo, data={"source": "data/bad", "labels": ["negative", "neutral", "positive"]})

    run = dvc(repo, "repro", "prepare")
    assert run.returncode != 0
    err = run.stderr + run.stdout
    for check in ("train/label_in_set", "test/no_leakage_from_train"):
        assert check in err, err
    assert "bogus" in err  # an example value is shown
    # Rows with an empty label are not errors but the unlabelled pool (docs/labelling.md): kept
    # out of every split, counted in the manifest.
    manifest = json.loads((repo / "metrics/data.json").read_text())
    assert manifest["unlabeled"]["rows"] == 2, manifest.get("unlabeled")
    assert "Traceback" not in err
    verdict = json.loads((repo / "metrics/validation.json").read_text())
    assert verdict["success"] is False
    # prepare did not run: its outputs and its lock entry are untouched.
    assert (repo / "data/processed/stats.json").read_bytes() == processed_before
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"] == lock_before


def test_full_repro_trains_evaluates_tracks_and_packages(tmp_path, tiny_model_dir):
    repo = tiny_repo(tmp_path / "repo", tiny_model_dir, export=True, max_epochs=2)
    # Serve export's int8 graph, refuse over-long texts, two worker processes.
    set_params(repo, serve={"runtime": "onnx_int8", "truncate": False, "workers": 2})
    home = tmp_path / "bentoml"
    run = dvc(repo, "repro", BENTOML_HOME=str(home))
    assert run.returncode == 0, run.stderr[-3000:]

    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert {"accuracy", "f1_macro", "f1_weighted", "loss", "per_class"} <= set(evaluation)
    assert evaluation["n"] == 9 and 0 <= evaluation["accuracy"] <= 1
    assert (repo / "models/model/model.safetensors").exists()
    assert (repo / "plots/eval/confusion.csv").exists() and (repo / "plots/train/loss.csv").exists()

    # One MLflow run for the whole pipeline, holding params, per-step and eval metrics, lineage.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert len(runs) == 1
    run_data, run_id = runs[0].data, runs[0].info.run_id
    assert json.loads((repo / "models/run.json").read_text())["run_id"] == run_id
    assert run_data.params["train.learning_rate"] == "0.001"
    assert run_data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"])
    assert len(client.get_metric_history(run_id, "train/loss")) >= 4  # per step, not per run
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    manifest = json.loads((repo / "metrics/data.json").read_text())
    assert run_data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert run_data.tags["data.sha256"] == manifest["source_sha256"]
    # Clean: only params.yaml (recorded in the run) and the pipeline's own outputs differ.
    assert run_data.tags["mlflow.source.git.branch"] and run_data.tags["git.dirty"] == "false"

    # The Bento exists in the store, and traces back to the run.
    info = json.loads((repo / "models/bento.json").read_text())
    assert info["mlflow_run_id"] == run_id
    bentoml = Path(sys.executable).parent / "bentoml"
    got = subprocess.run([str(bentoml), "get", info["bento_tag"], "-o", "json"],
                         env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert info["model_tag"] in got.stdout

    # Stage export ran after evaluate; the store holds its int8 graph (no PyTorch weights), which
    # `bentoml serve` runs under onnxruntime.
    parity = json.loads((repo / "metrics/export.json").read_text())
    assert parity["enabled"] and parity["rows"] == 9
    assert parity["torch"]["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert parity["onnx"]["agreement"] == 1.0 and "delta" in parity["onnx_int8"]
    assert {"model.onnx", "model.int8.onnx", "export.json"} <= set(os.listdir(repo / "models/onnx"))
    stored = home / "models" / Path(*info["model_tag"].split(":"))  # the store's layout
    assert (stored / "model.int8.onnx").exists()
    assert not list(stored.glob("*.safetensors")) and not (stored / "model.onnx").exists()
    assert_serves_onnx_and_refuses_long_texts(repo, home, info["model_tag"])


def service_workers(port: int) -> list:
    """BentoML's worker processes serving ``port``: each holds the listening socket it was given."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "_bentoml_impl.worker.service" not in " ".join(proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in proc.net_connections(kind="tcp")):
                found.append(proc)
    return found


def assert_serves_onnx_and_refuses_long_texts(repo: Path, home: Path, model_tag: str) -> None:
    import httpx

    with serving("bento.service:Classifier", home, repo, repo / "serve.log",
                 args=("--arg", f"model={model_tag}")) as url:
        assert len(service_workers(int(url.rsplit(":", 1)[1]))) == 2  # serve.workers
        meta = httpx.post(f"{url}/metadata", timeout=10).json()
        short = httpx.post(f"{url}/classify", json={"texts": ["great kettle"]}, timeout=30)
        long = httpx.post(f"{url}/classify", json={"texts": ["ok", "7 " * 40]}, timeout=30)
    assert meta["runtime"] == "onnx_int8" and meta["limits"]["truncate"] is False
    assert short.status_code == 200 and short.json()[0]["label"] in meta["labels"]
    assert long.status_code == 400, long.text  # serve.truncate false: 42 tokens > max_length 32
    assert "texts[1] has 42 tokens; this model reads at most 32" in long.text
