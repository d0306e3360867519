"""Stage gate: floors on in-memory metrics, then the stage against a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge import tracking
from lmforge.common import UserError, write_json
from lmforge.params import Floor, parse_params
from stages import gate
from tests.conftest import (
    start_process_group,
    stop_process_group,
    tmp_paths,
    write_trained_model,
)
from tests.helpers import free_port, git_commit, wait_healthy

EVAL = {
    "accuracy": 0.8, "f1_macro": 0.75, "f1_weighted": 0.78, "n": 9, "loss": 0.6,
    "per_class": {"negative": {"precision": 0.7, "recall": 0.6, "f1": 0.65, "support": 3}},
}


# --- floors, pure --------------------------------------------------------------------------------

def test_floors_pass_and_verdict_holds_only_numbers_and_booleans():
    verdict = gate.check_floors(EVAL, {"accuracy": Floor(min=0.6), "f1_macro": Floor(min=0.5)})
    assert verdict == {
        "passed": True, "failed": 0,
        "checks": {"accuracy": {"value": 0.8, "min": 0.6, "passed": True},
                   "f1_macro": {"value": 0.75, "min": 0.5, "passed": True}},
    }


def test_failed_floor_is_named_with_value_and_bound():
    verdict = gate.check_floors(EVAL, {"accuracy": Floor(min=0.9), "f1_macro": Floor(min=0.5)})
    assert verdict["passed"] is False and verdict["failed"] == 1
    assert verdict["checks"]["accuracy"] == {"value": 0.8, "min": 0.9, "passed": False}
    text = gate.failure_summary(verdict["checks"], "metrics/eval.json")
    assert "accuracy = 0.8, below min 0.9" in text
    assert "f1_macro" not in text  # only failures are listed


def test_max_bound_and_both_bounds():
    floors = {"loss": Floor(max=0.5), "accuracy": Floor(min=0.5, max=0.79)}
    verdict = gate.check_floors(EVAL, floors)
    assert verdict["checks"]["loss"] == {"value": 0.6, "max": 0.5, "passed": False}
    assert verdict["checks"]["accuracy"]["passed"] is False  # 0.8 > max 0.79
    text = gate.failure_summary(verdict["checks"], "eval.json")
    assert "loss = 0.6, above max 0.5" in text and "accuracy = 0.8, above max 0.79" in text
    assert gate.check_floors(EVAL, {"loss": Floor(max=0.7)})["passed"] is True


def test_nested_dotted_keys_reach_per_class_metrics():
    ok = gate.check_floors(EVAL, {"per_class.negative.f1": Floor(min=0.6)})
    assert ok["checks"]["per_class.negative.f1"] == {"value": 0.65, "min": 0.6, "passed": True}
    low = gate.check_floors(EVAL, {"per_class.negative.recall": Floor(min=0.7)})
    assert low["passed"] is False


def test_missing_or_non_numeric_metric_is_a_failed_check_not_a_crash():
    floors = {"acuracy": Floor(min=0.5), "per_class.negative": Floor(min=0.1),
              "per_class.positive.f1": Floor(min=0.1)}
    verdict = gate.check_floors(EVAL, floors)
    assert verdict["failed"] == 3
    assert verdict["checks"]["acuracy"] == {"value": None, "min": 0.5, "passed": False}
    text = gate.failure_summary(verdict["checks"], "metrics/eval.json")
    assert "acuracy: not a number in metrics/eval.json" in text
    assert "per_class.positive.f1" in text
    assert gate.check_floors({"ok": True}, {"ok": Floor(min=0)})["passed"] is False  # a bool is no score


def test_version_tags_carry_lineage_and_top_level_metrics():
    run_tags = {"mlflow.source.git.commit": "abc", "data.sha256": "d", "mlflow.user": "x"}
    tags = gate.version_tags(run_tags, EVAL)
    assert tags == {"git.commit": "abc", "data.sha256": "d", "test_accuracy": "0.8",
                    "test_f1_macro": "0.75", "test_f1_weighted": "0.78", "test_n": "9",
                    "test_loss": "0.6"}


# --- the stage, with an MLflow sqlite store ------------------------------------------------------

def stage_params(tmp_path, **gate_section):
    return parse_params({
        "paths": tmp_paths(tmp_path),
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "gate": {"floors": {"accuracy": {"min": 0.6}, "per_class.negative.f1": {"min": 0.5}},
                 "registered_model": "tiny-clf", **gate_section},
    })


def train_run(params, log_model: bool = True) -> str:
    """What train leaves behind: a run (id in paths.run_info) holding the model as an MLflow model."""
    run_id = tracking.start_run(params, ("gate",), "data-hash")
    if log_model:
        with tracking.resume_run(params):
            tracking.log_model(params, params.paths.model, ["the lamp is great"])
    return run_id


@pytest.fixture
def stage(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    head = git_commit(tmp_path)
    params = stage_params(tmp_path)
    write_trained_model(params.paths.model, tiny_model_dir)
    write_json(params.paths.eval_metrics, EVAL)
    return params, head


def test_passing_gate_registers_one_champion_version_per_trained_model(stage):
    from mlflow import MlflowClient

    params, head = stage
    client = MlflowClient(params.tracking.uri)
    first = train_run(params)
    verdict = gate.main(params)
    assert verdict["passed"] is True and verdict["registered_version"] == 1
    on_disk = json.loads(params.paths.gate.read_text())
    assert on_disk == verdict and on_disk["checks"]["per_class.negative.f1"]["value"] == 0.65

    v1 = client.get_model_version("tiny-clf", "1")
    assert v1.run_id == first and v1.aliases == ["champion"]
    (logged,) = client.get_run(first).outputs.model_outputs
    assert v1.source == f"models:/{logged.model_id}"  # registered from the logged model
    assert v1.tags["git.commit"] == head and v1.tags["data.sha256"] == "data-hash"
    assert v1.tags["test_accuracy"] == "0.8" and v1.tags["test_f1_macro"] == "0.75"
    assert v1.tags["gate.passed"] == "true"
    assert client.get_run(first).data.tags["gate.passed"] == "true"

    assert gate.main(params)["registered_version"] == 1  # same model gated again: no duplicate
    second = train_run(params)  # a new training run is a new version, and the champion
    assert gate.main(params)["registered_version"] == 2
    assert client.get_model_version_by_alias("tiny-clf", "champion").run_id == second
    assert client.get_model_version("tiny-clf", "1").aliases == []
    assert len(client.search_model_versions("name='tiny-clf'")) == 2


def test_failed_floor_writes_the_verdict_registers_a_candidate_then_stops(stage):
    from mlflow import MlflowClient

    params, _ = stage
    client = MlflowClient(params.tracking.uri)
    champion = train_run(params)
    gate.main(params)
    run_id = train_run(params)
    write_json(params.paths.eval_metrics, {**EVAL, "accuracy": 0.41})
    with pytest.raises(UserError, match=r"accuracy = 0.41, below min 0.6(.|\n)*v2 @candidate"):
        gate.main(params)
    on_disk = json.loads(params.paths.gate.read_text())
    assert on_disk["passed"] is False and on_disk["failed"] == 1
    assert on_disk["registered_version"] == 2
    assert client.get_model_version_by_alias("tiny-clf", "candidate").run_id == run_id
    assert client.get_model_version_by_alias("tiny-clf", "champion").run_id == champion  # kept
    assert client.get_model_version("tiny-clf", "2").tags["gate.passed"] == "false"
    assert client.get_run(run_id).data.tags["gate.passed"] == "false"

    write_json(params.paths.eval_metrics, EVAL)  # the same model passes now: champion, no candidate
    assert gate.main(params)["registered_version"] == 2
    assert client.get_model_version("tiny-clf", "2").aliases == ["champion"]


def test_the_champion_loads_and_predicts_in_a_fresh_python(stage, tmp_path):
    params, _ = stage
    train_run(params)
    gate.main(params)
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/tiny-clf@champion')\n"
        "out = model.predict(pd.DataFrame({'text': ['the lamp is great', 'awful and broke']}))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('lmforge', 'stages')]\n"
        "print(out.to_json(orient='records'))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking.uri}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 and {r["label"] for r in rows} <= {"negative", "neutral", "positive"}
    assert all(0 < r["score"] <= 1 for r in rows)


def test_registry_off_and_model_not_logged(stage, tmp_path):
    from mlflow import MlflowClient

    params, _ = stage
    off = stage_params(tmp_path, registered_model=None)
    train_run(off, log_model=False)
    assert gate.main(off)["registered_version"] is None
    assert MlflowClient(params.tracking.uri).search_registered_models() == []
    # registry on, nothing to register
    with pytest.raises(UserError, match="holds no model logged by train to register"):
        gate.main(params)


def test_missing_run_info_names_the_stage_to_run(stage):
    params, _ = stage
    with pytest.raises(UserError, match="dvc repro train"):
        gate.main(params)
    assert not params.paths.gate.exists()


@pytest.mark.slow
def test_registers_through_a_tracking_server(stage, tmp_path, monkeypatch):
    """A server returns versions as strings and validates the source against the run's artifacts."""
    from mlflow import MlflowClient

    params, _ = stage
    port = free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = start_process_group(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{uri}/health", server, timeout_s=120, what="mlflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_id = train_run(params)
        assert gate.main(params)["registered_version"] == 1  # an int, though the server sends "1"
        version = MlflowClient(uri).get_model_version_by_alias("tiny-clf", "champion")
        assert version.run_id == run_id and version.source.startswith("models:/")
    finally:
        stop_process_group(server, timeout_s=30)  # the server and the workers it started
