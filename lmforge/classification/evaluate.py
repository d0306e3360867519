"""Classification evaluation: score the trained classifier on the test split (stage evaluate), and
the scorer stage export runs on the same rows for PyTorch and ONNX alike.

``evaluate`` writes ``paths.eval_metrics`` (accuracy, F1, loss, per-class table),
``paths.eval_plots`` (``confusion.csv``: one actual,predicted row per test example;
``per_class.csv``) and ``paths.eval_reports/misclassified.csv`` (the misclassified rows the model
was surest about), and adds the test/* metrics and these files to train's MLflow run. Metrics come
from our local `evaluate` modules (lmforge/metrics), so nothing is fetched from the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from lmforge import tracking
from lmforge.common import DIGITS, UserError, read_json, rounded, write_json
from lmforge.metrics import load_metric
from lmforge.models import device, require_trained
from lmforge.params import Params
from lmforge.tasks import CLASSIFICATION, task

MISCLASSIFIED = task(CLASSIFICATION).reports[0]  # in paths.eval_reports
CONFUSION, PER_CLASS = task(CLASSIFICATION).plots  # in paths.eval_plots


def load_trained(folder: Path):
    """The trained classifier (eval mode, on the GPU when there is one) and its tokenizer."""
    require_trained(folder)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per run floods DVC's output
    # Our own train output: weights from safetensors, never code shipped beside them.
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False)
    except ValueError as err:  # a model trained with model.trust_remote_code
        raise UserError(f"{folder}: {' '.join(str(err).split())[:300]}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return model.to(device()).eval(), tokenizer


def model_labels(config, data_labels: list[str], folder: Path) -> list[str]:
    """The model's label names in id order; they must be the data's, or every metric is garbage."""
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    if labels != data_labels:
        raise UserError(
            f"{folder} predicts labels {labels}, but the prepared data has {data_labels}: "
            "the model is stale, run `dvc repro train`"
        )
    return labels


def predict_logits(model, tokenizer, rows: list[dict], batch_size: int) -> np.ndarray:
    """Logits (N, C) for encoded rows (input_ids etc. of varying length), in the rows' order.

    Logits, not probabilities, so the loss stays exact when a softmax would underflow to 0.
    """
    import torch

    device = next(model.parameters()).device

    def forward(batch) -> np.ndarray:
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()

    with torch.inference_mode():
        return batched_logits(forward, tokenizer, rows, batch_size, model.config.num_labels)


def batched_logits(forward, tokenizer, rows: list[dict], batch_size: int, width: int,
                   tensors: str = "pt") -> np.ndarray:
    """forward's logits (N, width) for encoded rows, in the rows' order, whatever runs the model.

    Rows are batched by length so each batch pads to a similar size; ``forward`` gets the padded
    batch (``tokenizer.pad`` output as ``tensors``: "pt" for PyTorch, "np" for onnxruntime).
    """
    keys = [k for k in tokenizer.model_input_names if rows and k in rows[0]]
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    logits = np.zeros((len(rows), width), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([{k: rows[i][k] for k in keys} for i in idx], return_tensors=tensors)
        logits[idx] = forward(batch)  # (B, C), back to the rows' own order
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C); exp cannot overflow
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_cross_entropy(logits: np.ndarray, refs: np.ndarray) -> float:
    return float(-log_softmax(logits)[np.arange(len(refs)), refs].mean())


def compute_metrics(preds, refs, labels: list[str]) -> dict:
    """Accuracy, macro/weighted F1 and the per-class table, keyed by label name."""
    preds, refs = [int(p) for p in preds], [int(r) for r in refs]
    f1 = load_metric("f1")
    # Every label id is passed, so a class missing from the test split still gets its row; the
    # F1 means cover the classes seen (true or predicted): an unseen one has no F1 (0/0) to average.
    table = load_metric("precision_recall").compute(
        predictions=preds, references=refs, labels=list(range(len(labels)))
    )
    return {
        "accuracy": load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"],
        "f1_macro": f1.compute(predictions=preds, references=refs, average="macro")["f1"],
        "f1_weighted": f1.compute(predictions=preds, references=refs, average="weighted")["f1"],
        "n": len(refs),
        "per_class": {
            name: {k: table[k][i] for k in ("precision", "recall", "f1", "support")}
            for i, name in enumerate(labels)
        },
    }


def worst_errors(texts, refs, probs: np.ndarray, labels: list[str], k: int) -> pd.DataFrame:
    """The k misclassified rows with the highest probability on their (wrong) prediction."""
    preds = probs.argmax(axis=1)
    rows = np.arange(len(refs))
    table = pd.DataFrame({
        "text": list(texts),
        "actual": [labels[r] for r in refs],
        "predicted": [labels[p] for p in preds],
        "confidence": probs[rows, preds].round(DIGITS),
        "prob_actual": probs[rows, refs].round(DIGITS),
    })
    wrong = table[preds != np.asarray(refs)]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(k)


def plot_tables(preds, refs, metrics: dict, labels: list[str]) -> dict[str, pd.DataFrame]:
    """DVC plot data: the confusion template takes one actual,predicted row per example."""
    confusion = pd.DataFrame({"actual": [labels[r] for r in refs],
                              "predicted": [labels[p] for p in preds]})
    per_class = pd.DataFrame([{"label": name, **row} for name, row in metrics["per_class"].items()])
    return {CONFUSION: confusion, PER_CLASS: per_class}


def flat_metrics(metrics: dict, prefix: str = "test/") -> dict[str, float]:
    """MLflow metrics are flat: test/accuracy, test/f1_<label>, ... (label made key-safe), grouped
    under test/ in the MLflow UI."""
    flat = {f"{prefix}{k}": float(v) for k, v in metrics.items() if k != "per_class"}
    for label, row in metrics["per_class"].items():
        safe = re.sub(r"[^\w\-. ]", "_", label)  # MLflow keys: no "/" (read as a path), no odd chars
        flat |= {f"{prefix}{k}_{safe}": float(row[k]) for k in ("precision", "recall", "f1")}
    return flat


def load_test_split(processed: Path) -> tuple[list[dict], list[str]]:
    """The encoded test rows and the data's label names in id order."""
    mapping = read_json(processed / "labels.json", "run `dvc repro prepare` first")
    from datasets import load_from_disk

    test = load_from_disk(str(processed / "datasets"))["test"]
    if len(test) == 0:
        raise UserError(f"{processed}: the test split is empty; nothing to evaluate")
    labels = [mapping["id2label"][str(i)] for i in range(len(mapping["id2label"]))]
    return test.to_list(), labels


def evaluate(params: Params) -> dict:
    """Score the trained classifier on the test split; write and log the results."""
    paths = params.paths
    model, tokenizer = load_trained(paths.model)
    rows, data_labels = load_test_split(paths.processed)
    labels = model_labels(model.config, data_labels, paths.model)
    print(f"evaluate: scoring {len(rows)} test rows", flush=True)  # a log file shows the phase
    logits = predict_logits(model, tokenizer, rows, params.evaluate.batch_size)
    refs = np.array([r["labels"] for r in rows])
    preds = logits.argmax(axis=1)
    scores = compute_metrics(preds, refs, labels)
    per_class = scores.pop("per_class")  # the nested table goes last in the file
    metrics = rounded({**scores, "loss": mean_cross_entropy(logits, refs), "per_class": per_class})

    write_json(paths.eval_metrics, metrics)
    written = [paths.eval_metrics]
    paths.eval_plots.mkdir(parents=True, exist_ok=True)
    for name, table in plot_tables(preds, refs, metrics, labels).items():
        table.to_csv(paths.eval_plots / name, index=False)
        written.append(paths.eval_plots / name)
    probs = np.exp(log_softmax(logits))
    errors = worst_errors([r["text"] for r in rows], refs, probs, labels,
                          params.evaluate.worst_examples)
    paths.eval_reports.mkdir(parents=True, exist_ok=True)
    errors.to_csv(paths.eval_reports / MISCLASSIFIED, index=False)
    tracking.log_to_run(params, flat_metrics(metrics), [*written, paths.eval_reports / MISCLASSIFIED])
    print(f"evaluate: accuracy {metrics['accuracy']}, f1_macro {metrics['f1_macro']}, "
          f"{len(errors)} errors listed", flush=True)
    return metrics
