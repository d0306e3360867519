"""Evaluate: batched prediction, metrics, error table, and the stage end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lmforge import tracking
from lmforge.classification import evaluate as clf_eval
from lmforge.common import UserError, write_json
from stages import evaluate
from tests.conftest import LABELS, write_trained_model


def save_model(params, tiny_model_dir, labels=LABELS):
    write_trained_model(params.paths.model, tiny_model_dir, labels)


@pytest.fixture
def trained_params(prepared_params, tiny_model_dir):
    save_model(prepared_params, tiny_model_dir)
    tracking.start_run(prepared_params, ("train",), "hash")
    return prepared_params


def test_predict_logits_matches_one_row_at_a_time_in_row_order(trained_params):
    import torch
    from datasets import load_from_disk

    model, tokenizer = clf_eval.load_trained(trained_params.paths.model)
    rows = load_from_disk(str(trained_params.paths.processed / "datasets"))["test"].to_list()
    assert len({len(r["input_ids"]) for r in rows}) > 1  # lengths vary: sorting reorders rows
    with torch.inference_mode():
        one_by_one = np.stack([
            model(**{k: torch.tensor([r[k]]) for k in ("input_ids", "attention_mask")}).logits[0]
            for r in rows
        ])
    batched = clf_eval.predict_logits(model, tokenizer, rows, batch_size=5)
    assert batched.shape == (len(rows), 3)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)  # padding changes nothing


def test_cross_entropy_is_exact_for_confident_mistakes():
    import torch

    logits = np.array([[1000.0, 0.0, 0.0], [0.2, 0.5, -1.0]], dtype=np.float32)
    refs = np.array([1, 1])
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(refs)).item()
    assert clf_eval.mean_cross_entropy(logits, refs) == pytest.approx(expected, rel=1e-5)
    assert clf_eval.mean_cross_entropy(logits, refs) > 500  # not clipped at log(1e-12)


def test_compute_metrics_by_hand_keeps_absent_classes():
    # Class 0: P 2/3 R 1; class 1: P 1/2 R 1; class 2: P 1 R 1/3; class 3 never occurs.
    out = clf_eval.compute_metrics([0, 0, 1, 1, 2, 0], [0, 0, 1, 2, 2, 2], LABELS + ["spam"])
    assert out["accuracy"] == pytest.approx(4 / 6)
    # A class neither true nor predicted anywhere has no F1 to average (0/0): macro skips it.
    assert out["f1_macro"] == pytest.approx((4 / 5 + 2 / 3 + 1 / 2) / 3)
    assert out["f1_weighted"] == pytest.approx((2 * 4 / 5 + 2 / 3 + 3 / 2) / 6)
    assert out["n"] == 6
    assert list(out["per_class"]) == LABELS + ["spam"]
    assert out["per_class"]["positive"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3})
    assert out["per_class"]["spam"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_worst_errors_are_wrong_and_sorted_by_confidence():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.99, 0.01]])
    refs = np.array([0, 0, 1, 1, 1])  # rows 1, 2 and 4 are wrong
    table = clf_eval.worst_errors(list("abcde"), refs, probs, ["no", "yes"], k=2)
    assert table["text"].tolist() == ["e", "b"]
    assert table["confidence"].tolist() == [0.99, 0.8]
    assert table["prob_actual"].tolist() == [0.01, 0.2]
    assert (table["actual"] != table["predicted"]).all()
    assert len(clf_eval.worst_errors(list("abcde"), refs, probs, ["no", "yes"], k=10)) == 3


def test_flat_metrics_name_every_class():
    metrics = clf_eval.compute_metrics([0, 1], [0, 0], ["a b!", "c"])
    flat = clf_eval.flat_metrics(metrics)
    assert flat["test/accuracy"] == 0.5
    assert {"test/f1_a b_", "test/precision_c", "test/recall_c", "test/n"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_main_writes_metrics_plots_errors_and_logs_to_the_train_run(trained_params, capsys):
    from mlflow.tracking import MlflowClient

    paths = trained_params.paths
    with tracking.resume_run(trained_params):  # as train leaves it: the model logged in the run
        model_id = tracking.log_model(trained_params, paths.model, ["the lamp is great"])
    capsys.readouterr()
    metrics = evaluate.main(trained_params)
    phases = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluate:")]
    assert phases[:2] == [f"evaluate: classification, {paths.model} on the test split",
                          "evaluate: scoring 12 test rows"]

    saved = json.loads(paths.eval_metrics.read_text())
    assert saved == metrics
    assert set(saved) == {"accuracy", "f1_macro", "f1_weighted", "loss", "n", "per_class"}
    assert saved["n"] == 12
    assert all(0 <= saved[k] <= 1 for k in ("accuracy", "f1_macro", "f1_weighted"))
    assert saved["loss"] > 0
    assert list(saved["per_class"]) == LABELS
    assert sum(row["support"] for row in saved["per_class"].values()) == 12

    confusion = pd.read_csv(paths.eval_plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 12
    correct = (confusion["actual"] == confusion["predicted"]).mean()
    assert saved["accuracy"] == pytest.approx(correct, abs=1e-6)
    per_class = pd.read_csv(paths.eval_plots / "per_class.csv")
    assert per_class.columns.tolist() == ["label", "precision", "recall", "f1", "support"]

    errors = pd.read_csv(paths.eval_reports / "misclassified.csv")
    assert len(errors) == min(20, (confusion["actual"] != confusion["predicted"]).sum())
    assert len(errors) > 0  # an untrained head gets some rows wrong
    assert (errors["actual"] != errors["predicted"]).all()
    assert errors["confidence"].is_monotonic_decreasing
    assert ((errors["confidence"] >= errors["prob_actual"]) & (errors["confidence"] <= 1)).all()

    client = MlflowClient(tracking_uri=trained_params.tracking.uri)
    run_id = tracking.run_id(paths.run_info)
    logged = client.get_run(run_id).data.metrics
    assert logged["test/accuracy"] == pytest.approx(saved["accuracy"])
    assert {"test/f1_macro", "test/loss", "test/f1_negative", "test/recall_positive"} <= set(logged)
    on_model = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert on_model["test/accuracy"] == pytest.approx(saved["accuracy"])  # on the model's page
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert artifacts == {"evaluate/eval.json", "evaluate/confusion.csv",
                         "evaluate/per_class.csv", "evaluate/misclassified.csv"}


def test_missing_run_info_says_to_train_first(prepared_params):
    with pytest.raises(UserError, match=r"run\.json not found: run `dvc repro train` first"):
        evaluate.main(prepared_params)


def test_missing_model_folder_is_named(prepared_params):
    write_json(prepared_params.paths.run_info, {"run_id": "unused"})
    with pytest.raises(UserError, match=rf"{prepared_params.paths.model}: no trained model"):
        evaluate.main(prepared_params)


def test_model_with_other_labels_is_refused(prepared_params, tiny_model_dir):
    save_model(prepared_params, tiny_model_dir, labels=["positive", "negative", "neutral"])
    write_json(prepared_params.paths.run_info, {"run_id": "unused"})
    with pytest.raises(UserError, match=r"predicts labels \['positive'.*the model is stale"):
        evaluate.main(prepared_params)
