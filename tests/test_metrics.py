"""Local `evaluate` metrics: hand-computed values, agreement with scikit-learn, sacrebleu and
rouge-score called directly, offline loading."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from lmforge.common import UserError
from lmforge.metrics import available, load_metric
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
    assert available() == ["accuracy", "bleu", "f1", "perplexity", "precision_recall", "rouge"]


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


# Text pairs for BLEU and ROUGE: a perfect match, a disjoint pair, and two partial overlaps.
PREDICTIONS = ["the cat sat on the mat", "purple monkey dishwasher",
               "a quick brown fox jumps over the dog", "it is raining today in the city"]
REFERENCES = ["the cat sat on the mat", "green tea with lemon",
              "the quick brown fox jumped over the lazy dog", "today it rains in the city centre"]


def test_perplexity_of_a_uniform_distribution_is_its_size():
    import torch

    vocab = 7
    # A model that is uniform over 7 tokens: every target costs ln 7 nats, whatever the token.
    logits = torch.zeros(2, 5, vocab)  # (B, T, V)
    targets = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])  # row 0: 3 targets, row 1: 5
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            ignore_index=-100, reduction="none").view(2, 5).sum(1)
    out = load_metric("perplexity").compute(nll=nll.tolist(), tokens=[3, 5])
    assert out["perplexity"] == pytest.approx(vocab)
    assert out["loss"] == pytest.approx(math.log(vocab))
    assert out["tokens"] == 8


def test_perplexity_weighs_tokens_not_sequences():
    # Row A: 1 token at p = 1/2 (perplexity 2). Row B: 3 tokens at p = 1/8 each (perplexity 8).
    # Per token: exp((ln 2 + 3 ln 8) / 4) = 2 ** 2.5; the mean of the rows' perplexities would be 5.
    out = load_metric("perplexity").compute(nll=[math.log(2), 3 * math.log(8)], tokens=[1, 3])
    assert out["perplexity"] == pytest.approx(2**2.5)
    assert out["perplexity"] != pytest.approx((2 + 8) / 2)
    assert out["loss"] == pytest.approx(10 * math.log(2) / 4)
    with pytest.raises(ValueError, match="no target tokens"):
        load_metric("perplexity").compute(nll=[0.0], tokens=[0])


def test_bleu_equals_sacrebleu():
    import sacrebleu

    bleu = load_metric("bleu")
    out = bleu.compute(predictions=PREDICTIONS, references=REFERENCES)
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
    assert out["score"] == pytest.approx(expected.score)
    assert out["precisions"] == pytest.approx(expected.precisions)
    assert (out["counts"], out["totals"]) == (list(expected.counts), list(expected.totals))
    assert out["bp"] == pytest.approx(expected.bp)
    assert (out["sys_len"], out["ref_len"]) == (expected.sys_len, expected.ref_len)
    assert 0 < out["score"] < 100
    assert bleu.compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1])["score"] == (
        pytest.approx(100.0))
    assert bleu.compute(predictions=PREDICTIONS[1:2], references=REFERENCES[1:2])["score"] == 0.0
    json.dumps(out)


def test_bleu_with_several_references_per_prediction():
    import sacrebleu

    second = ["a cat was on the mat", "tea", "a brown fox jumps over a dog", "rain in the city"]
    out = load_metric("bleu").compute(predictions=PREDICTIONS,
                                      references=[list(r) for r in zip(REFERENCES, second, strict=True)])
    assert out["score"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, second]).score)


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    out = load_metric("rouge").compute(predictions=PREDICTIONS, references=REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert pairs[0]["rougeL"].fmeasure == 1.0 and pairs[1]["rouge1"].fmeasure == 0.0
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert out[kind] == pytest.approx(sum(p[kind].fmeasure for p in pairs) / len(pairs))
        assert 0 < out[kind] < 1
    assert set(out) == {"rouge1", "rouge2", "rougeL"}
    perfect = load_metric("rouge").compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1])
    assert perfect == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_unknown_metric_is_named():
    with pytest.raises(UserError, match=r"metric 'meteor'.*\['accuracy', 'bleu', 'f1', 'perplexity'"):
        load_metric("meteor")


def test_loads_offline_and_writes_only_to_the_hf_cache(tmp_path):
    """A fresh HF cache, the hub switched off and unroutable: the metrics still load and compute."""
    hf_home = tmp_path / "hf"
    code = (
        "from lmforge.metrics import load_metric\n"
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
