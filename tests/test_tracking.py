"""Tracking helpers: where runs go, and what a run is tagged with."""

from __future__ import annotations

from lmforge.params import Tracking
from lmforge.tracking import flat_params, lineage_tags, tracking_uri


def test_relative_sqlite_store_resolves_against_the_dvc_root(tmp_path, monkeypatch):
    # A queued `dvc exp run` works in a temp copy; DVC_ROOT names the repo the store belongs to.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(Tracking()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(Tracking(uri="sqlite:////abs/store.db")) == "sqlite:////abs/store.db"
    assert tracking_uri(Tracking(uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_environment_overrides_params(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(Tracking()) == "http://127.0.0.1:5999"


def test_lineage_tags_name_the_experiment_under_dvc_exp_run(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lr-high")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    tags = lineage_tags("f" * 64)
    assert tags["dvc.exp_name"] == "lr-high" and tags["dvc.baseline_rev"] == "abc123"
    assert tags["data.sha256"] == "f" * 64 and tags["git.dirty"] in {"true", "false"}


def test_flat_params_are_dotted_strings():
    from lmforge.params import Params

    flat = flat_params(Params(), ("train",))
    assert flat["train.learning_rate"] == "0.0001"
    assert flat["train.early_stopping.monitor"] == "val_accuracy"
    assert all(key.startswith("train.") for key in flat)
