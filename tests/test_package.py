"""Package: the trained model enters the BentoML store with its lineage; a Bento is built around it.

The helpers here (a temporary BentoML home, a fake train/evaluate output) are shared with
tests/test_service.py.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from stages import package
from stages.common import UserError, read_json, write_json

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
RUN_ID = "0123456789abcdef"
DATA_SHA = "ab" * 32


@contextmanager
def bentoml_home(home: Path):
    """Point BentoML at stores under `home`, in this process and in the processes it starts.

    BentoML caches its home and stores in singletons on first use, so the environment variable
    alone is not enough once any earlier test touched a store; the overrides are undone on exit.
    """
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("bentos", "models", "tmp", "envs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    overrides = {
        "bentoml_home": str(home), "bento_store_dir": str(home / "bentos"),
        "model_store_dir": str(home / "models"), "tmp_bento_store_dir": str(home / "tmp"),
        "env_store_dir": str(home / "envs"), "model_store": ModelStore(str(home / "models")),
        "bento_store": BentoStore(str(home / "bentos")), "tmp_bento_store": BentoStore(str(home / "tmp")),
    }
    old_env = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    for name, value in overrides.items():
        getattr(BentoMLContainer, name).set(value)
    try:
        yield home
    finally:
        for name in overrides:
            getattr(BentoMLContainer, name).reset()
        if old_env is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old_env


def write_trained_model(model_dir: Path, tiny_model_dir: Path) -> None:
    """What train leaves in paths.model: a 3-class model with real label names, tokenizer, labels.json."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)}, ignore_mismatched_sizes=True,
    )
    # An untrained head gives every text ~1/3 per class; sharper logits make texts distinguishable,
    # which the service tests need to see that each answer belongs to its own text.
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    model.save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(model_dir))
    write_json(model_dir / "labels.json", {
        "id2label": {str(i): name for i, name in enumerate(LABELS)},
        "label2id": {name: i for i, name in enumerate(LABELS)},
    })


def write_upstream(params) -> None:
    """The other inputs of package: train's run info, evaluate's metrics, ingest's manifest."""
    write_json(params.paths.run_info, {"run_id": RUN_ID, "experiment_id": "1",
                                       "tracking_uri": "sqlite:///mlflow.db"})
    write_json(params.paths.eval_metrics, {"accuracy": 0.875, "f1_macro": 0.8611})
    write_json(params.paths.manifest, {"source_sha256": DATA_SHA})


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


def test_lineage_needs_both_test_metrics():
    with pytest.raises(UserError, match="f1_macro"):
        package.lineage({"run_id": "r"}, {"source_sha256": DATA_SHA}, {"accuracy": 0.9})
    tags = package.lineage({"run_id": "r"}, {"source_sha256": DATA_SHA},
                           {"accuracy": 0.9, "f1_macro": 0.85})
    assert tags["mlflow_run_id"] == "r" and tags["test_accuracy"] == "0.9000"
    assert all(isinstance(v, str) for v in tags.values())  # BentoML labels are strings
