"""`lmforge lineage`: a finished tiny run matches the store; tampering and missing files are reported."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from lmforge import cli, lineage, tasks, tracking
from lmforge.common import write_json
from lmforge.params import Params, parse_params
from stages import package
from tests.conftest import REPO, bentoml_home, tmp_paths, write_trained_model
from tests.helpers import LM_METRICS, lm_params, write_trained_lm

DATA_SHA = "da" * 32


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """`lmforge ...` in-process: (exit status, stdout)."""
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code, capsys.readouterr().out


def _write_params_yaml(folder, params: Params) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))


def _with(params: Params, section: str, **changes) -> Params:
    return params.model_copy(update={section: getattr(params, section).model_copy(update=changes)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished tiny pipeline: an MLflow run, data/validation/eval/gate files, a packaged model.

    Returns (params, BentoML home).
    """
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("lineage")
    params = parse_params({
        "paths": tmp_paths(root),
        "model": {"source": str(tiny_model_dir)},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    })
    write_trained_model(params.paths.model, tiny_model_dir)
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})
    write_json(params.paths.validation, {"success": True, "checks_failed": 0})
    write_json(params.paths.eval_metrics, {"accuracy": 0.875, "f1_macro": 0.86})
    write_json(params.paths.gate, {"passed": True, "failed": 0, "checks": {}, "registered_version": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # start_run exports it; undone on exit
        run_id = tracking.start_run(params, tasks.MODEL_SECTIONS, DATA_SHA)
        MlflowClient(params.tracking.uri).log_metric(run_id, "test/accuracy", 0.875)
        mp.chdir(REPO)  # the Bento's build context
        with bentoml_home(root / "bentoml"):
            package.main(params)
    return params, root / "bentoml"


def test_params_hash_covers_exactly_the_sections_that_shape_the_model():
    base = Params()
    digest = tracking.params_hash(base)
    assert len(digest) == 64 and int(digest, 16) >= 0
    reloaded = parse_params(json.loads(json.dumps(base.model_dump(mode="json", by_alias=True))))
    assert tracking.params_hash(reloaded) == digest  # stable through a dump and reload
    for section, change in [("train", {"learning_rate": 0.5}), ("data", {"seed": 7}),
                            ("prepare", {"max_length": 64}), ("model", {"source": "x"})]:
        assert tracking.params_hash(_with(base, section, **change)) != digest, section
    for section, change in [("serve", {"max_texts": 3}), ("evaluate", {"batch_size": 2}),
                            ("tracking", {"uri": "http://127.0.0.1:1"}),
                            ("align", {"learning_rate": 0.5})]:  # align off: it shapes nothing
        assert tracking.params_hash(_with(base, section, **change)) == digest, section
    aligned = _with(base, "align", method="grpo")  # align on: its knobs shape the served model
    assert tracking.params_hash(aligned) != digest
    assert tracking.params_hash(_with(aligned, "align", learning_rate=0.5)) != tracking.params_hash(
        aligned)


def test_consistency_says_match_mismatch_or_not_found():
    mine = {"mlflow_run_id": "r1", "data_sha256": "d1", "params_sha256": None}
    got = lineage.consistency(mine, {"mlflow_run_id": "r1", "data_sha256": "d2", "params_sha256": "p"})
    assert {k: v["verdict"] for k, v in got.items()} == {
        "mlflow_run_id": "MATCH", "data_sha256": "MISMATCH", "params_sha256": "not found"}
    assert got["data_sha256"] == {"verdict": "MISMATCH", "workspace": "d1", "store": "d2"}
    assert {v["verdict"] for v in lineage.consistency(mine, None).values()} == {"not found"}


def test_finished_run_matches_the_store(finished, tmp_path, monkeypatch, capsys):
    params, home = finished
    monkeypatch.chdir(REPO)  # the git commit package labelled the model with
    with bentoml_home(home):
        report = lineage.collect(params)
        run_id = json.loads(params.paths.run_info.read_text())["run_id"]
        assert {k: v["verdict"] for k, v in report["consistency"].items()} == dict.fromkeys(
            lineage.CHECKED, "MATCH")
        assert report["workspace"]["params_sha256"] == tracking.params_hash(params)
        assert report["workspace"]["git_commit"] not in ("", "unknown")
        assert report["data"] == {"sha256": DATA_SHA}
        assert report["validation"] == {"passed": True, "checks_failed": 0}
        assert report["gate"] == {"passed": True, "failed": 0, "registered_version": 3}
        mlflow = report["mlflow"]
        assert mlflow["run_id"] == run_id and mlflow["tracking_uri"] == params.tracking.uri
        assert mlflow["status"] == "FINISHED" and mlflow["test_accuracy"] == 0.875
        assert mlflow["data_sha256"] == DATA_SHA
        bento = report["bento"]
        assert bento["bento_in_store"] is True
        assert bento["model_tag"].startswith("lmforge-classifier:")
        labels = bento["model_labels"]
        assert labels["validation_passed"] == "true" and labels["test_accuracy"] == "0.8750"
        assert labels["git_commit"] == report["workspace"]["git_commit"]

        # Through the console script, from a folder holding params.yaml, as a user runs it.
        _write_params_yaml(tmp_path, params)
        monkeypatch.chdir(tmp_path)
        code, out = _cli(["lineage", "--json"], capsys)
        assert code == 0
        assert json.loads(out)["consistency"] == report["consistency"]
        code, out = _cli(["lineage"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    verdicts = [row[-2:] for row in rows[-len(lineage.CHECKED):]]  # the consistency block ends it
    assert verdicts == [[field, "MATCH"] for field in lineage.CHECKED]
    assert ["data", "sha256", DATA_SHA] in rows and ["status", "FINISHED"] in rows


def test_tampering_after_packaging_is_a_mismatch(finished, tmp_path, monkeypatch, capsys):
    params, home = finished
    info = json.loads(params.paths.run_info.read_text())
    tampered = tmp_path / "run.json"
    write_json(tampered, {**info, "run_id": "f" * 32})  # as if train re-ran without package
    edited = _with(params, "paths", run_info=tampered)
    with bentoml_home(home):
        report = lineage.collect(edited)
        assert report["consistency"]["mlflow_run_id"] == {
            "verdict": "MISMATCH", "workspace": "f" * 32, "store": info["run_id"]}
        assert report["consistency"]["data_sha256"]["verdict"] == "MATCH"
        assert report["mlflow"]["status"].startswith("not found")  # no such run in the store

        retuned = lineage.collect(_with(params, "train", learning_rate=0.5))  # params.yaml edited
        assert retuned["consistency"]["params_sha256"]["verdict"] == "MISMATCH"
        assert retuned["consistency"]["mlflow_run_id"]["verdict"] == "MATCH"

        _write_params_yaml(tmp_path, edited)
        monkeypatch.chdir(tmp_path)
        code, out = _cli(["lineage"], capsys)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("consistency"))
    assert row.split()[1:3] == ["mlflow_run_id", "MISMATCH"] and info["run_id"] in row


def test_causal_lm_workspace_matches_its_packaged_model(tmp_path, monkeypatch, capsys):
    """No classes anywhere: the lineage labels carry the test perplexity and generation scores."""
    from mlflow import MlflowClient

    params = lm_params(tmp_path, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    write_trained_lm(params.paths.model)
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})
    write_json(params.paths.validation, {"success": True, "checks_failed": 0})
    write_json(params.paths.eval_metrics, LM_METRICS)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_id = tracking.start_run(params, tasks.MODEL_SECTIONS, DATA_SHA)
    MlflowClient(params.tracking.uri).log_metric(run_id, "test/perplexity", 123.456)
    monkeypatch.chdir(REPO)  # the Bento's build context
    with bentoml_home(tmp_path / "bentoml"):
        package.main(params)
        report = lineage.collect(params)
        _write_params_yaml(tmp_path, params)
        monkeypatch.chdir(tmp_path)
        code, out = _cli(["lineage"], capsys)
    assert code == 0
    assert {k: v["verdict"] for k, v in report["consistency"].items()} == dict.fromkeys(
        lineage.CHECKED, "MATCH")
    assert report["workspace"]["task"] == "causal_lm"
    assert report["mlflow"]["test_perplexity"] == 123.456 and "test_accuracy" not in report["mlflow"]
    labels = report["bento"]["model_labels"]
    assert labels["test_perplexity"] == "123.4560" and labels["test_rougeL"] == "0.1875"
    assert report["bento"]["model_tag"].startswith("lmforge-lm:")
    assert ["status", "FINISHED"] in [line.split() for line in out.splitlines()]


def test_missing_files_are_reported_not_produced_yet(tmp_path, monkeypatch, capsys):
    params = parse_params({"paths": tmp_paths(tmp_path / "nothing")})
    _write_params_yaml(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    code, out = _cli(["lineage", "--json"], capsys)
    report = json.loads(out)
    assert code == 0  # nothing disagrees: there is nothing yet
    for section, stage in [("data", "ingest"), ("validation", "validate"), ("gate", "gate"),
                           ("mlflow", "train"), ("bento", "package")]:
        assert report[section] == f"not produced yet (run `dvc repro {stage}`)"
    assert {c["verdict"] for c in report["consistency"].values()} == {"not found"}
    assert "not produced yet (run `dvc repro package`)" in lineage.render(report)


def test_an_unreachable_store_is_reported_and_left_untouched(tmp_path):
    params = parse_params({"paths": tmp_paths(tmp_path)})
    missing_db = tmp_path / "gone.db"
    write_json(params.paths.run_info, {"run_id": "r", "tracking_uri": f"sqlite:///{missing_db}"})
    status = lineage.collect(params)["mlflow"]["status"]
    assert status.startswith("unreachable") and str(missing_db) in status
    assert not missing_db.exists()  # MLflow would have created an empty store there

    with socket.socket() as s:  # a port nobody listens on: refused at once, no retries
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_json(params.paths.run_info, {"run_id": "r", "tracking_uri": f"http://127.0.0.1:{port}"})
    assert lineage.collect(params)["mlflow"]["status"].startswith("unreachable")
