"""Multi-process training: the real train stage under `train.strategy: ddp` with two CPU processes
(gloo), run by `dvc repro train` in a tiny copy of the repo.

What must hold however many processes train: validation metrics cover the validation split exactly
once (DDP's sampler would pad it to a multiple of the process count, counting rows twice), one
model is written (by rank 0), and the pipeline execution is one MLflow run. Then the cluster
recipe of docs/scaling.md on one machine: torchrun launches the stage, `dvc commit` records it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import dvc, tiny_repo

PROCESSES = 2
BATCH = 8


def validation_scores(model_dir: Path, datasets: Path) -> tuple[float, float, int]:
    """(mean loss, accuracy, rows) of the saved model on the validation split, one row at a time
    in this single process: the reference the distributed metrics must equal."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = load_from_disk(str(datasets))["validation"]
    losses, hits = [], 0
    with torch.no_grad():
        for row in rows:
            inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask",
                                                           "token_type_ids") if k in row}
            out = model(**inputs, labels=torch.tensor([row["labels"]]))
            losses.append(out.loss.item())
            hits += int(out.logits.argmax(-1).item() == row["labels"])
    return sum(losses) / len(losses), hits / len(rows), len(rows)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_scores_the_whole_validation_set_once(tmp_path, tiny_model_dir):
    epochs = 3
    repo = tiny_repo(tmp_path / "repo", tiny_model_dir, max_epochs=epochs, batch_size=BATCH,
                     learning_rate=5e-3, strategy="ddp", devices=PROCESSES, accelerator="cpu",
                     early_stopping=None)
    run = dvc(repo, "repro", "train")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    stats = json.loads((repo / "data/processed/stats.json").read_text())
    n_train = stats["train"]["rows"]
    metrics = json.loads((repo / "metrics/train.json").read_text())
    # Each process trained on its own shard: half the optimizer steps of a single process.
    assert metrics["steps"] == epochs * math.ceil(math.ceil(n_train / PROCESSES) / BATCH)

    loss, accuracy, n_val = validation_scores(repo / "models/model", repo / "data/processed/datasets")
    assert n_val % PROCESSES, "an odd validation split: a padded sampler would count a row twice"
    assert metrics["best_val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["best_val_loss"] == pytest.approx(loss, abs=5e-6)

    # One model, written once: rank 0 alone reports it, and no half-swapped folder is left.
    assert run.stdout.count("train: {") == 1, run.stdout
    assert (repo / "models/model/model.safetensors").is_file()
    assert {p.name for p in (repo / "models").glob(".*")} == {".gitkeep"}  # no .model.tmp/.old
    assert len(list((repo / "models/checkpoints").glob("best-*.ckpt"))) == 1

    # One MLflow run, holding each step's loss once.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert len(runs) == 1
    assert json.loads((repo / "models/run.json").read_text())["run_id"] == runs[0].info.run_id
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(metrics["steps"]))

    # The cluster recipe of docs/scaling.md on one machine: torchrun starts the processes (rank
    # from its environment, not from Lightning's launcher), then `dvc commit` records the outputs.
    shutil.rmtree(repo / "models/checkpoints")  # a fresh launch
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launched = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node",
                               str(PROCESSES), "-m", "stages.train"], cwd=repo, env=env,
                              capture_output=True, text=True)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    assert launched.stdout.count("train: {") == 1
    again = json.loads((repo / "metrics/train.json").read_text())
    assert again["best_val_loss"] == metrics["best_val_loss"]  # same seed, same shards, same model
    assert dvc(repo, "commit", "-f", "train").returncode == 0
    assert "up to date" in dvc(repo, "status", "train").stdout
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2  # one per execution


@pytest.mark.parametrize("rows, world, batch", [(9, 2, 64), (161, 2, 64), (10, 3, 4), (129, 2, 64)])
def test_val_sampler_scores_every_row_once_in_equal_batch_counts(rows, world, batch):
    from lmforge.training.lit import val_sampler

    order = list(range(rows))[::-1]
    shards = [list(val_sampler(order, world, rank, batch)) for rank in range(world)]
    batches = {math.ceil(len(shard) / batch) for shard in shards}
    assert len(batches) == 1  # a sharded forward (FSDP) would hang on a process a batch short
    scored = [i for shard in shards for i in shard]
    if len(scored) == rows:  # each row on one process
        assert sorted(scored) == list(range(rows))
    else:  # (129, 2, 64): 65 and 64 rows would be 2 and 1 batches; every process scores all
        assert all(shard == order for shard in shards)
    assert val_sampler(order, 1, 0, batch) == order
