"""Local `evaluate` metrics: hand-computed values, agreement with scikit-learn, offline loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from stages.common import UserError
from stages.metrics import available, load_metric
from tests.conftest import REPO

# Worked by hand. Class 0: TP 2, FP 1 (row 5)        -> P 2/3, R 1,   F1 4/5
#                 Class 1: TP 1, FP 1 (row 3)         -> P 1/2, R 1,   F1 2/3
#                 Class 2: TP 1, FN 2 (rows 3 and 5)  -> P 1,   R 1/3, F1 1/2
PREDS = [0, 0, 1, 1, 2, 0]
REFS = [0, 0, 1, 2, 2, 2]


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in ("accuracy", "f1", "precision_recall")}


def test_every_metric_folder_is_listed():
    assert available() == ["accuracy", "f1", "precision_recall"]


def test_accuracy_by_hand(metrics):
    acc = metrics["accuracy"]
    assert acc.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1]) == {"accuracy": 0.75}
    assert acc.compute(predictions=PREDS, references=REFS)["accuracy"] == pytest.approx(4 / 6)
    assert acc.compute(predictions=PREDS, references=REFS, normalize=False)["accuracy"] == 4


def test_f1_by_hand(metrics):
    f1 = metrics["f1"]
    def score(average):
        return f1.compute(predictions=PREDS, references=REFS, average=average)["f1"]

    assert score("macro") == pytest.approx((4 / 5 + 2 / 3 + 1 / 2) / 3)
    assert score("weighted") == pytest.approx((2 * 4 / 5 + 1 * 2 / 3 + 3 * 1 / 2) / 6)  # supports
    assert score("micro") == pytest.approx(4 / 6)  # single-label micro-F1 is accuracy
    assert score(None) == pytest.approx([4 / 5, 2 / 3, 1 / 2])
    binary = f1.compute(predictions=[0, 0, 1, 1, 0], references=[0, 1, 0, 1, 0])["f1"]
    assert binary == pytest.approx(0.5)  # pos_label 1: P 1/2, R 1/2


def test_per_class_by_hand_with_an_absent_class(metrics):
    out = metrics["precision_recall"].compute(predictions=PREDS, references=REFS, labels=[0, 1, 2, 3])
    assert out["precision"] == pytest.approx([2 / 3, 1 / 2, 1.0, 0.0])
    assert out["recall"] == pytest.approx([1.0, 1.0, 1 / 3, 0.0])
    assert out["f1"] == pytest.approx([4 / 5, 2 / 3, 1 / 2, 0.0])
    assert out["support"] == [2, 1, 3, 0]  # class 3 never occurs and still gets its row
    f1_per_class = metrics["f1"].compute(
        predictions=PREDS, references=REFS, average=None, labels=[0, 1, 2, 3]
    )["f1"]
    assert len(f1_per_class) == 4
    json.dumps(out)  # plain Python numbers, ready for a metrics file


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_scikit_learn_on_random_labels(metrics, seed):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 5, 300).tolist()
    # Mostly right, class 4 never predicted: exercises the 0/0 precision case.
    preds = [r if r < 4 and rng.random() < 0.6 else int(rng.integers(0, 4)) for r in refs]
    labels = list(range(5))
    acc = metrics["accuracy"].compute(predictions=preds, references=refs)["accuracy"]
    assert acc == pytest.approx(accuracy_score(refs, preds))
    for average in ("macro", "micro", "weighted"):
        got = metrics["f1"].compute(predictions=preds, references=refs, average=average)["f1"]
        assert got == pytest.approx(f1_score(refs, preds, average=average, zero_division=0.0))
    per_class = metrics["precision_recall"].compute(predictions=preds, references=refs, labels=labels)
    expected = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0.0)
    for key, want in zip(("precision", "recall", "f1", "support"), expected, strict=True):
        assert per_class[key] == pytest.approx(want.tolist())
    assert per_class["precision"][4] == 0.0


def test_unknown_metric_is_named():
    with pytest.raises(UserError, match=r"metric 'bleu'.*\['accuracy', 'f1', 'precision_recall'\]"):
        load_metric("bleu")


def test_loads_offline_and_writes_only_to_the_hf_cache(tmp_path):
    """A fresh HF cache, the hub switched off and unroutable: the metrics still load and compute."""
    hf_home = tmp_path / "hf"
    code = (
        "from stages.metrics import load_metric\n"
        "print(load_metric('f1').compute(predictions=[0, 1], references=[0, 0], average='macro'))"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    work = tmp_path / "cwd"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "{'f1': 0.3333333333333333}" in out.stdout
    assert not any(work.iterdir())  # nothing in the working directory
    files = [p.relative_to(hf_home) for p in hf_home.rglob("*") if p.is_file()]
    assert any(p.name == "f1.py" for p in files)
    assert all(p.parts[0] == "modules" for p in files), files  # no cached predictions elsewhere
