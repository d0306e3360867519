"""Tracking helpers: where runs go, and what a run is tagged with."""

from __future__ import annotations

from lmforge.params import Paths, Tracking
from lmforge.tracking import flat_params, git_state, lineage_tags, own_files, tracking_uri
from tests.helpers import git


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
    # One set of git tags: MLflow's own source tags (shown on the run page), plus git.dirty.
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.git.branch"]
    assert "git.commit" not in tags and "git.branch" not in tags


def test_git_dirty_counts_changed_source_not_what_the_pipeline_writes(tmp_path, monkeypatch):
    files = {"stages/train.py": "code", "params.yaml": "train: {}", "dvc.lock": "lock",
             "metrics/eval.json": "{}", "plots/train/loss.csv": "step", "models/run.json": "{}"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    ours = own_files(Paths())
    assert git_state(ours) == {"commit": git(tmp_path, "rev-parse", "HEAD"), "branch": git(
        tmp_path, "rev-parse", "--abbrev-ref", "HEAD"), "dirty": "false"}

    for name in ("params.yaml", "dvc.lock", "metrics/eval.json", "plots/train/loss.csv",
                 "models/run.json"):  # what `dvc repro` (or `dvc exp run -S`) changes
        (tmp_path / name).write_text("changed")
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_state(ours)["dirty"] == "false"
    assert git_state()["dirty"] == "true"  # the same files, counted when nothing is ignored
    (tmp_path / "stages/train.py").write_text("edited")
    assert git_state(ours)["dirty"] == "true"


def test_outside_git_the_state_is_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state() == {"commit": "unknown", "branch": "unknown", "dirty": "unknown"}


def test_flat_params_are_dotted_strings():
    from lmforge.params import Params

    flat = flat_params(Params(), ("train",))
    assert flat["train.learning_rate"] == "0.0001"
    assert flat["train.early_stopping.monitor"] == "val_accuracy"
    assert all(key.startswith("train.") for key in flat)
