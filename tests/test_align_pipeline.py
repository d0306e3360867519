"""Stage align through `dvc repro`, in one copy of the repo on the DPO example shrunk to a tiny
model and 60 preference rows: off it changes nothing downstream; a bad reward function stops the
pipeline before evaluate; a run killed mid-way resumes and ends byte-identical to an unkilled one,
and gate registers the aligned model."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.overlay import Replace, apply_overlay, load_overlay
from tests.helpers import copy_repo, dvc, mlflow_client

pytestmark = pytest.mark.slow

TINY = {
    "data": {"source": "data/tiny_preferences.csv", "split": {"validation": 0.15, "test": 0.15}},
    "model": {"scratch": {"layers": 2, "heads": 2, "hidden": 32, "context": 64, "vocab_size": 400,
                          "min_frequency": 1}},
    "prepare": {"max_length": 64},
    "train": {"batch_size": 8, "max_epochs": 3, "learning_rate": 3e-3, "log_every_n_steps": 1,
              "checkpoint_every_n_steps": None},
    "evaluate": {"max_generations": 5, "generation": {"max_new_tokens": 8}},
    "align": {"method": "none", "batch_size": 4, "max_steps": 6, "eval_batch_size": 8,
              "grpo": {"group_size": 2, "max_new_tokens": 8}},
    # Floors and tolerances on align's metrics are refused while align is off.
    "gate": {"floors": Replace({"rougeL": {"min": 0.0}}),
             "tolerances": Replace({"rougeL": {"direction": "higher", "abs": 0.01}})},
}


def write_params(repo: Path, **overrides: dict) -> None:
    """params.yaml := the committed one + examples/lm_dpo.yaml + TINY + ``overrides``."""
    params = yaml.safe_load((repo / "params.yaml.committed").read_text())
    for overlay in (load_overlay(repo / "examples" / "lm_dpo.yaml"), TINY, overrides):
        params = apply_overlay(params, overlay)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(repo: Path) -> str:
    run = dvc(repo, "repro", BENTOML_HOME=str(repo.parent / "bentoml"))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return run.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PATH": path}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The repo after a full `dvc repro` with align off."""
    repo = copy_repo(tmp_path_factory.mktemp("align") / "repo")
    (repo / "params.yaml.committed").write_text((repo / "params.yaml").read_text())
    with (repo / "data/sample/preferences.csv").open() as f:
        rows = list(csv.reader(f))[:61]  # header + 60 rows
    with (repo / "data/tiny_preferences.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    write_params(repo)
    repro(repo)
    return repo


def test_align_off_is_a_marker_and_evaluate_scores_exactly_what_it_scores_without_the_stage(repo):
    assert sorted(p.name for p in (repo / "models/aligned").iterdir()) == ["align.json"]
    assert json.loads((repo / "metrics/align.json").read_text()) == {"aligned": False}
    assert dvc(repo, "status").stdout.strip() == "Data and pipelines are up to date."
    outputs = [repo / "metrics/eval.json", repo / "reports/eval/generations.csv",
               repo / "plots/eval/perplexity.csv"]
    with_stage = [digest(f) for f in outputs]
    assert "align" not in json.loads(outputs[0].read_text())

    # Without the stage: evaluate alone on train's model, nothing of align's in place.
    aligned = repo / "models/aligned"
    aligned.rename(repo / "aligned.kept")
    try:
        done = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=repo, env=env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        (repo / "aligned.kept").rename(aligned)
    assert [digest(f) for f in outputs] == with_stage

    # An align knob changed while align is off re-runs align alone: its marker is the same bytes.
    write_params(repo, align={"dpo": {"beta": 0.3}})  # the overlay says 0.5
    out = repro(repo)
    assert "Running stage 'align'" in out and "Running stage 'evaluate'" not in out
    assert dvc(repo, "status").stdout.strip() == "Data and pipelines are up to date."


def test_a_reward_function_that_raises_stops_the_pipeline_before_evaluate(repo):
    (repo / "rewards/broken.py").write_text(
        "def score(prompt, completion, reference):\n    raise ValueError('no answer parsed')\n")
    before = {f: digest(repo / f) for f in ("metrics/eval.json", "metrics/align.json")}
    write_params(repo, align={"method": "grpo", "grpo": {"rewards": {
        "parsed": {"function": "rewards.broken:score"}}}})
    try:
        run = dvc(repo, "repro")
        assert run.returncode != 0
        says = run.stderr + run.stdout
        assert "error: reward rewards.broken:score raised ValueError: no answer parsed on prompt '" in says
        assert "Running stage 'evaluate'" not in run.stdout
        assert {f: digest(repo / f) for f in before} == before
    finally:
        (repo / "rewards/broken.py").unlink()
        write_params(repo)


def test_align_killed_mid_run_resumes_and_ends_as_an_unkilled_run(repo):
    write_params(repo, align={"method": "dpo", "max_steps": 300, "checkpoint_every_n_steps": 5})
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = repo / "models/align_checkpoints/last.pt"
    for line in proc.stdout:  # killed once align has saved a checkpoint (step 5, 10, ...)
        if line.startswith("align: step") and last.exists():
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (repo / "models/aligned/model.safetensors").exists()  # still the marker

    out = repro(repo)
    assert "align: resuming from models/align_checkpoints/last.pt (step " in out
    resumed = {f: digest(repo / f) for f in ("models/aligned/model.safetensors",
                                             "plots/align/steps.csv")}
    summary = json.loads((repo / "metrics/align.json").read_text())
    assert summary["steps"] == 300
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert set(ev["align"]) == {"exact_match", "preference_accuracy", "margin"}
    # gate registered align's model (logged at step ALIGNED), not train's (step TRAINED)
    client = mlflow_client(repo)
    run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    steps = {m.model_id: m.step for m in client.get_run(run_id).outputs.model_outputs}
    assert sorted(steps.values()) == [0, 1]
    version = json.loads((repo / "metrics/gate.json").read_text())["registered_version"]
    registered = client.get_model_version("lmforge-lm", str(version))
    assert steps[registered.source.removeprefix("models:/")] == 1

    # The same run, never killed: align alone, with its checkpoints cleared.
    subprocess.run(["rm", "-rf", "models/align_checkpoints"], cwd=repo, check=True)
    done = subprocess.run([sys.executable, "-m", "stages.align"], cwd=repo, env=env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout
    assert {f: digest(repo / f) for f in resumed} == resumed
