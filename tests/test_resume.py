"""Crash and resume: `dvc repro train` killed with SIGKILL mid-epoch, then `dvc repro` again, ends
exactly where an uninterrupted run of the same params ends (CPU, same seed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpointed_repo, dvc

pytestmark = pytest.mark.slow

STEPS = 2 * 15  # 2 epochs of 60 train rows in batches of 4


def outcome(repo: Path) -> tuple[dict, bytes, str]:
    """What the two runs must share: test metrics, exported weights, the per-step loss curve."""
    return (json.loads((repo / "metrics/eval.json").read_text()),
            (repo / "models/model/model.safetensors").read_bytes(),
            (repo / "plots/train/loss.csv").read_text())


def kill_after_first_checkpoint(repo: Path, timeout_s: float = 120) -> int:
    """Start `dvc repro train`, SIGKILL its process group once last.ckpt exists; its global step."""
    last = repo / "models/checkpoints/last.ckpt"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (repo.parent / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not last.exists():
            assert proc.poll() is None, (repo.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no last.ckpt within the time limit"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    # The checkpoint is renamed into place whole, so it loads even though the writer was killed.
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def test_killed_training_resumes_and_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    crashed = checkpointed_repo(tmp_path / "crashed", tiny_model_dir)
    run = dvc(crashed, "repro", "prepare")
    assert run.returncode == 0, run.stderr[-3000:]
    # The twin starts from the same prepared data (its lock says prepare is up to date).
    twin = tmp_path / "twin"
    shutil.copytree(crashed, twin, symlinks=True)

    run = dvc(twin, "repro", "evaluate")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming" not in run.stdout
    assert json.loads((twin / "metrics/train.json").read_text())["steps"] == STEPS

    metrics_before = (crashed / "metrics/train.json").read_bytes()  # the committed one
    killed_at = kill_after_first_checkpoint(crashed)
    assert 0 < killed_at < STEPS // 2, killed_at  # mid-epoch, inside the first epoch
    model = crashed / "models/model"  # persisted: the last good one, or none, never half
    assert not model.exists() or (model / "model.safetensors").exists()
    # train never got to write: its persisted outputs are the ones from before the run
    assert (crashed / "metrics/train.json").read_bytes() == metrics_before

    run = dvc(crashed, "repro", "evaluate")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: resuming from" in run.stdout, run.stdout[-3000:]
    summary = json.loads((crashed / "metrics/train.json").read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == STEPS

    resumed, uninterrupted = outcome(crashed), outcome(twin)
    assert resumed[0] == uninterrupted[0]  # eval.json: accuracy, loss, per_class, ...
    assert resumed[1] == uninterrupted[1]  # the exported weights, byte for byte
    assert resumed[2] == uninterrupted[2]  # every step's training loss
