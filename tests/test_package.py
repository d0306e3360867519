"""Package: the trained model enters the BentoML store with its lineage; a Bento is built around it.

The fake upstream outputs (run info, eval metrics, manifest, validation verdict) are shared with
tests/test_service.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import lineage, package
from stages.common import UserError, read_json, write_json
from tests.conftest import LABELS, REPO, bentoml_home, write_trained_model

RUN_ID = "0123456789abcdef"
DATA_SHA = "ab" * 32


def write_upstream(params) -> None:
    """The other inputs of package: run info, eval metrics, data manifest, validation verdict."""
    write_json(params.paths.run_info, {"run_id": RUN_ID, "experiment_id": "1",
                                       "tracking_uri": "sqlite:///mlflow.db"})
    write_json(params.paths.eval_metrics, {"accuracy": 0.875, "f1_macro": 0.8611})
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})
    write_json(params.paths.validation, {"success": True, "checks_failed": 0})


def test_main_stores_model_with_lineage_and_builds_bento(
    prepared_params, tiny_model_dir, tmp_path, monkeypatch
):
    import bentoml

    params = prepared_params
    write_trained_model(params.paths.model, tiny_model_dir)
    write_upstream(params)
    monkeypatch.chdir(REPO)  # the build context: bento/ and the bentofile live there
    with bentoml_home(tmp_path / "bentoml"):
        info = package.main(params)
        model = bentoml.models.get(info["model_tag"])
        bento = bentoml.get(info["bento_tag"])
        second = package.main(params)  # a new version; its Bento must pin the new model
        assert bentoml.get(second["bento_tag"]).info.args == {"model": second["model_tag"]}
        assert second["model_tag"] != info["model_tag"]

    assert read_json(params.paths.bento_info, "") == second
    assert info["mlflow_run_id"] == RUN_ID and info["data_sha256"] == DATA_SHA
    assert info["model_tag"].startswith("lmforge-classifier:")
    assert model.info.labels["mlflow_run_id"] == RUN_ID
    assert model.info.labels["data_sha256"] == DATA_SHA
    assert model.info.labels["test_f1_macro"] == "0.8611"
    assert model.info.labels["git_commit"] == info["git_commit"] != ""
    # The params that shaped the model, hashed as `lmforge lineage` hashes the workspace's.
    assert model.info.labels["params_sha256"] == lineage.params_hash(params) == info["params_sha256"]
    assert model.info.labels["validation_passed"] == "true"
    meta = model.info.metadata
    assert meta["serve"] == params.serve.model_dump()
    assert meta["labels"] == LABELS and meta["max_length"] == params.prepare.max_length
    stored = Path(model.path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json"} <= {
        p.name for p in stored.iterdir()
    }
    assert json.loads((stored / "config.json").read_text())["id2label"]["2"] == "positive"

    # The Bento pins this exact model version and carries the lineage; only the service is inside.
    assert bento.info.args == {"model": info["model_tag"]}
    assert info["model_tag"] in {str(m.tag) for m in bento.info.all_models}
    assert bento.info.labels["model"] == info["model_tag"]
    assert bento.info.labels["mlflow_run_id"] == RUN_ID
    src = Path(bento.path) / "src"
    assert (src / "bento" / "service.py").exists()
    assert not (src / "stages").exists() and not (src / "params.yaml").exists()


def test_missing_model_folder_is_named(prepared_params, tmp_path):
    write_upstream(prepared_params)
    with bentoml_home(tmp_path / "bentoml"), pytest.raises(UserError) as err:
        package.main(prepared_params)
    assert str(prepared_params.paths.model) in str(err.value)
    assert "dvc repro train" in str(err.value)


def test_label_mapping_must_match_the_model_config(tmp_path):
    write_json(tmp_path / "config.json", {"id2label": {"0": "neg", "1": "pos"}})
    write_json(tmp_path / "labels.json", {"id2label": {"0": "pos", "1": "neg"}})
    with pytest.raises(UserError, match="differs from labels.json"):
        package.model_label_names(tmp_path)
    write_json(tmp_path / "labels.json", {"id2label": {"0": "neg", "1": "pos"}})
    assert package.model_label_names(tmp_path) == ["neg", "pos"]


def test_lineage_needs_both_test_metrics_and_a_validation_verdict():
    run, data, ok = {"run_id": "r"}, {"source_sha256": DATA_SHA}, {"success": True}
    with pytest.raises(UserError, match="f1_macro"):
        package.lineage(run, data, {"accuracy": 0.9}, ok, "p" * 64)
    scores = {"accuracy": 0.9, "f1_macro": 0.85}
    with pytest.raises(UserError, match="dvc repro validate"):
        package.lineage(run, data, scores, {"checks_failed": 0}, "p" * 64)
    tags = package.lineage(run, data, scores, ok, "p" * 64)
    assert tags["mlflow_run_id"] == "r" and tags["test_accuracy"] == "0.9000"
    assert tags["params_sha256"] == "p" * 64 and tags["validation_passed"] == "true"
    assert package.lineage(run, data, scores, {"success": False}, "")["validation_passed"] == "false"
    assert all(isinstance(v, str) for v in tags.values())  # BentoML labels are strings
