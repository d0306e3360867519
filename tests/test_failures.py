"""A mistake never costs a trained model. Through `dvc repro` in a copy of the repo: a bad param, an
injected failure in any stage's writes, or a SIGKILL mid-training leaves every output of every stage
byte-identical, and the next good `dvc repro` succeeds.

The injected failures use the environment variable reserved for tests (lmforge.common.FAIL_ENV):
the named output's write raises just before it would land, after the stage did all its work.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.common import FAIL_ENV
from tests.helpers import dvc, set_params, tiny_repo

pytestmark = pytest.mark.slow

# Every output of every stage, as DVC declares them (models/checkpoints is train's resume state,
# not an output: a killed run leaves its last.ckpt there on purpose).
OUTPUT_ROOTS = ("data/raw", "data/interim", "data/processed", "metrics", "models", "plots", "reports")


def snapshot(repo: Path) -> dict[str, str]:
    """SHA-256 of every output file, by path (hidden write-aside leftovers included: none may stay)."""
    files = {}
    for root in OUTPUT_ROOTS:
        for f in sorted((repo / root).rglob("*")):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and not rel.startswith("models/checkpoints/"):
                files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir) -> tuple[Path, str, dict[str, str]]:
    """A tiny repo after a full good `dvc repro` (export on): the repo, its params.yaml, outputs."""
    repo = tiny_repo(tmp_path_factory.mktemp("failures") / "repo", tiny_model_dir, export=True)
    run = dvc(repo, "repro")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return repo, (repo / "params.yaml").read_text(), snapshot(repo)


# (what fails, the params change that makes that stage re-run, the output whose write fails, and
# what the error must say)
CASES = {
    "check: a typo in train": ({"train": {"learning_rat": 0.1}}, None,
                               "train.learning_rat: unknown key: did you mean 'learning_rate'?"),
    "check: a typo in a section no stage reads": ({"tracking": {"experimnt": "x"}}, None,
                                                   "did you mean 'experiment'?"),
    "check: a missing data.source": ({"data": {"source": "data/nope.csv"}}, None,
                                     "data.source: data/nope.csv does not exist"),
    "ingest": ({"data": {"seed": 7}}, "metrics/data.json", "injected failure"),
    "audit": ({"audit": {"seed": 7}}, "metrics/audit.json", "injected failure"),
    "prepare": ({"prepare": {"map_batch_size": 50}}, "data/processed", "injected failure"),
    "train: refused on this machine": ({"train": {"precision": "16-mixed"}}, None,
                                       "train.precision: '16-mixed' on a CPU"),
    "train": ({"train": {"seed": 7}}, "metrics/train.json", "injected failure"),
    "select": ({"select": {"top_n": 3}}, "reports/select", "injected failure"),
    "align": ({"align": {"seed": 7}}, "metrics/align.json", "injected failure"),  # method none
    "evaluate": ({"evaluate": {"worst_examples": 3}}, "plots/eval", "injected failure"),
    "export": ({"export": {"latency_repeats": 2}}, "models/onnx", "injected failure"),
    "gate": ({"gate": {"floors": {"accuracy": {"min": 0.01}}}}, "metrics/gate.json",
             "injected failure"),
    "package": ({"serve": {"max_texts": 32}}, "models/bento.json", "injected failure"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_in_any_stage_leaves_every_output_byte_identical(built, case):
    repo, params, before = built
    change, fail_at, says = CASES[case]
    try:
        set_params(repo, **change)
        run = dvc(repo, "repro", **({FAIL_ENV: fail_at} if fail_at else {}))
        assert run.returncode != 0, f"{case}: dvc repro succeeded:\n{run.stdout[-2000:]}"
        assert says in run.stderr + run.stdout, (run.stdout[-2000:], run.stderr[-2000:])
        assert snapshot(repo) == before
    finally:
        (repo / "params.yaml").write_text(params)


def test_a_training_killed_mid_run_leaves_every_output_and_the_next_repro_succeeds(built):
    repo, params, before = built
    try:
        set_params(repo, train={"seed": 8, "max_epochs": 50})  # long enough to be killed inside
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines = []
        for line in proc.stdout:  # train has started once DVC says so and its state file is new
            lines.append(line)
            if "Running stage 'train'" in line:
                break
        state = repo / "models/checkpoints/train_state.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (state.exists() and '"finished": false'
                                                   in state.read_text()):
            time.sleep(0.2)
        time.sleep(2)  # into the training loop
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert snapshot(repo) == before, "".join(lines)
    finally:
        (repo / "params.yaml").write_text(params)
    set_params(repo, train={"seed": 8})
    run = dvc(repo, "repro")  # the next good run goes through, and replaces the outputs
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    after = snapshot(repo)
    assert after["models/model/model.safetensors"] != before["models/model/model.safetensors"]
    assert not [f for f in after if f.endswith((".new", ".old")) or ".new/" in f or ".old/" in f]
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["seed"] == 8
