"""Determinism: the tiny pipeline run from two clean copies gives identical results on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import checkpointed_repo

pytestmark = pytest.mark.slow

# Everything training decides, down to the bytes: the exported weights, both curves, the test
# metrics (accuracy, loss, per_class) and the rows the model got wrong.
OUTPUTS = ("models/model/model.safetensors", "plots/train/loss.csv", "plots/train/val.csv",
           "metrics/eval.json", "reports/eval/misclassified.csv")


def start_repro(repo: Path) -> subprocess.Popen:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_clean_copies_train_and_evaluate_identically(tmp_path, tiny_model_dir):
    repos = [checkpointed_repo(tmp_path / name, tiny_model_dir) for name in ("a", "b")]
    # At the same time: each copy sees other threads competing for the cores, as on a busy machine.
    runs = [start_repro(repo) for repo in repos]
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-3000:]

    a, b = repos
    for rel in OUTPUTS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between runs"
    evaluation = json.loads((a / "metrics/eval.json").read_text())
    assert {"accuracy", "loss", "per_class"} <= set(evaluation)
    trained = json.loads((a / "metrics/train.json").read_text())
    assert trained["best_epoch"] is not None and trained["steps"] == 30
