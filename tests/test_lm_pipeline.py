"""End to end for task causal_lm: each committed example overlay, shrunk to a tiny model and a few
dozen rows, through `dvc repro` (every stage, Bento included) in a copy of the repo."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.overlay import apply_overlay, load_overlay
from tests.helpers import copy_repo, dvc

pytestmark = pytest.mark.slow

TINY_MODEL = {"layers": 2, "heads": 2, "hidden": 32, "context": 64, "vocab_size": 400,
              "min_frequency": 1}
TINY_TRAIN = {"batch_size": 8, "max_epochs": 3, "learning_rate": 3e-3, "log_every_n_steps": 1,
              "checkpoint_every_n_steps": None}


def use_example(repo: Path, example: str, **overrides: dict) -> dict:
    """params.yaml := the committed params.yaml + the example overlay + ``overrides`` (same merge)."""
    params = apply_overlay(yaml.safe_load((repo / "params.yaml").read_text()),
                           load_overlay(repo / "examples" / example))
    params = apply_overlay(params, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def repro(repo: Path, tmp_path: Path) -> None:
    run = dvc(repo, "repro", BENTOML_HOME=str(tmp_path / "bentoml"))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])


def mlflow_run(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_pretraining_from_scratch_on_plain_text(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    docs = (repo / "data/sample/stories.txt").read_text().split("\n\n")[:80]
    (repo / "data/tiny.txt").write_text("\n\n".join(docs) + "\n")
    use_example(repo, "lm_pretrain.yaml",
                data={"source": "data/tiny.txt", "split": {"validation": 0.15, "test": 0.15}},
                model={"scratch": TINY_MODEL}, prepare={"block_size": 32, "max_length": 64},
                train=TINY_TRAIN,
                evaluate={"max_generations": 3, "prefix_tokens": 8,
                          "generation": {"max_new_tokens": 6}},
                gate={"floors": {"perplexity": {"max": 1e6}}})
    repro(repo, tmp_path)

    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert {"perplexity", "perplexity_start", "loss", "tokens", "n"} <= set(ev)
    assert "bleu" not in ev  # plain text: no references to score generations against
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-4)
    # Untrained, the model is about as unsure as the vocabulary is large; training must beat that.
    assert ev["perplexity_start"] > 100 and ev["perplexity"] < ev["perplexity_start"] / 2
    generations = pd.read_csv(repo / "reports/eval/generations.csv")
    assert len(generations) == 3 and generations["generated"].notna().all()
    lm = json.loads((repo / "models/model/lm.json").read_text())
    assert lm["format"] == "text" and not (repo / "models/model/labels.json").exists()
    trained = json.loads((repo / "metrics/train.json").read_text())
    assert trained["train_tokens_per_s"] > 0 and trained["best_val_perplexity"] > 1

    run = mlflow_run(repo)
    assert run.data.params["task"] == "causal_lm"
    assert run.data.metrics["test/perplexity"] == pytest.approx(ev["perplexity"])
    info = json.loads((repo / "models/bento.json").read_text())
    assert info["mlflow_run_id"] == run.info.run_id
    assert dvc(repo, "status").stdout.strip() == "Data and pipelines are up to date."


def test_instruction_tuning_on_pairs_masks_prompts_and_scores_generations(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    with (repo / "data/sample/pairs.csv").open() as f:
        rows = list(csv.reader(f))[:61]  # header + 60 pairs
    with (repo / "data/tiny_pairs.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    use_example(repo, "lm_instruct.yaml",
                data={"source": "data/tiny_pairs.csv", "split": {"validation": 0.15, "test": 0.15}},
                model={"scratch": TINY_MODEL}, prepare={"max_length": 64}, train=TINY_TRAIN,
                evaluate={"max_generations": 5, "generation": {"max_new_tokens": 8}},
                gate={"floors": {"rougeL": {"min": 0.0}}})
    repro(repo, tmp_path)

    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert {"perplexity", "perplexity_start", "bleu", "rouge1", "rouge2", "rougeL"} <= set(ev)
    assert 0 <= ev["bleu"] <= 100 and 0 <= ev["rougeL"] <= 1 and ev["generated"] == 5
    assert ev["perplexity"] < ev["perplexity_start"]
    generations = pd.read_csv(repo / "reports/eval/generations.csv", keep_default_na=False)
    test = pd.read_parquet(repo / "data/interim/test.parquet")
    assert list(generations["reference"]) == list(test["response"][:5])
    lm = json.loads((repo / "models/model/lm.json").read_text())
    assert lm["format"] == "pairs" and lm["template"] == "{prompt}\nAnswer: "
    gate = json.loads((repo / "metrics/gate.json").read_text())
    assert gate["passed"] is True and "rougeL" in gate["checks"]
