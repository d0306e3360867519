"""Package: the trained model enters the BentoML store with its lineage; a Bento is built around it.

The fake upstream outputs (run info, eval metrics, manifest, validation verdict) and the tiny causal
LM train output, shared with tests/test_service.py and tests/test_generate_service.py, are in
tests/helpers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import tracking
from lmforge.common import UserError, read_json, write_json
from stages import package
from tests.conftest import LABELS, REPO, bentoml_home, write_trained_model
from tests.helpers import DATA_SHA, LM_METRICS, RUN_ID, TEMPLATE, lm_params, write_trained_lm, write_upstream


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
    assert model.info.labels["params_sha256"] == tracking.params_hash(params) == info["params_sha256"]
    assert model.info.labels["validation_passed"] == "true"
    meta = model.info.metadata
    assert meta["serve"] == params.serve.model_dump(exclude_none=True)
    assert meta["runtime"] == "torch" and meta["onnx_file"] == ""
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
    assert bento.info.service == "bento.service:Classifier"
    assert model.info.metadata["task"] == "classification"


def test_causal_lm_is_packaged_with_its_prompt_format_for_the_generator(tmp_path, monkeypatch):
    import bentoml

    params = lm_params(tmp_path, serve={"max_new_tokens": 16})
    write_trained_lm(params.paths.model)
    write_upstream(params, LM_METRICS)
    assert not (params.paths.model / "labels.json").exists()  # causal_lm has no classes
    monkeypatch.chdir(REPO)
    with bentoml_home(tmp_path / "bentoml"):
        info = package.main(params)
        model = bentoml.models.get(info["model_tag"])
        bento = bentoml.get(info["bento_tag"])

    assert info["model_tag"].startswith("lmforge-lm:")
    meta = model.info.metadata
    assert meta["task"] == "causal_lm" and meta["format"] == "pairs" and meta["template"] == TEMPLATE
    assert meta["context"] == 64  # the config's n_positions
    assert meta["serve"] == params.serve.model_dump(exclude_none=True)
    assert meta["serve"]["max_new_tokens"] == 16
    assert "labels" not in meta and "max_length" not in meta
    labels = model.info.labels
    assert labels["test_perplexity"] == "123.4560"
    assert labels["test_bleu"] == "3.5000" and labels["test_rougeL"] == "0.1875"
    assert "test_accuracy" not in labels and "test_f1_macro" not in labels
    assert labels["params_sha256"] == tracking.params_hash(params)
    assert {"model.safetensors", "lm.json", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in Path(model.path).iterdir()}
    # The bentofile names the classifier; package builds the causal LM's Bento with the generator.
    assert bento.info.service == "bento.generate:Generator"
    assert "POST /generate" in (Path(bento.path) / "README.md").read_text()  # the description
    routes = {r["route"] for r in bento.info.schema["routes"]}
    assert routes == {"/generate", "/generate_stream", "/metadata"}
    assert bento.info.args == {"model": info["model_tag"]}
    assert info["model_tag"] in {str(m.tag) for m in bento.info.all_models}
    shipped = {p.name for p in (Path(bento.path) / "src" / "bento").iterdir()}
    assert {"generate.py", "limits.py", "prompts.py"} <= shipped


def test_causal_lm_folder_needs_lm_json_not_labels(tmp_path):
    params = lm_params(tmp_path, pairs=False)
    write_trained_lm(params.paths.model, fmt="text")
    assert package.model_facts("causal_lm", params.paths.model) == {
        "format": "text", "template": "", "context": 64}  # metadata holds no None
    with pytest.raises(UserError, match="labels.json"):  # the classifier's check would refuse it
        package.model_facts("classification", params.paths.model)
    (params.paths.model / "lm.json").unlink()
    with pytest.raises(UserError, match=r"lacks lm.json"):
        package.model_facts("causal_lm", params.paths.model)


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
    assert tags["test_f1_macro"] == "0.8500" and "test_perplexity" not in tags
    assert tags["mlflow_run_id"] == "r" and tags["test_accuracy"] == "0.9000"
    assert tags["params_sha256"] == "p" * 64 and tags["validation_passed"] == "true"
    assert package.lineage(run, data, scores, {"success": False}, "")["validation_passed"] == "false"
    assert all(isinstance(v, str) for v in tags.values())  # BentoML labels are strings


def test_causal_lm_lineage_labels_perplexity_and_generation_scores_when_present():
    run, data, ok = {"run_id": "r"}, {"source_sha256": DATA_SHA}, {"success": True}
    with pytest.raises(UserError, match="perplexity"):
        package.lineage(run, data, {"accuracy": 0.9, "f1_macro": 0.8}, ok, "", "causal_lm")
    plain = package.lineage(run, data, {"perplexity": 12.3456789, "loss": 2.5}, ok, "", "causal_lm")
    assert plain["test_perplexity"] == "12.3457"
    assert not {"test_bleu", "test_rougeL", "test_accuracy"} & set(plain)
    pairs = package.lineage(run, data, LM_METRICS, ok, "", "causal_lm")
    assert (pairs["test_bleu"], pairs["test_rougeL"]) == ("3.5000", "0.1875")
