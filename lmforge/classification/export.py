"""Classification for stage export: the test rows scored by accuracy and macro-F1 through PyTorch
or an ONNX runner, padded and batched exactly as stage evaluate does."""

from __future__ import annotations

import numpy as np

from lmforge.classification.evaluate import (
    batched_logits,
    compute_metrics,
    load_test_split,
    load_trained,
    model_labels,
    predict_logits,
)
from lmforge.params import Params
from lmforge.tasks import CLASSIFICATION, task


class ExportScorer:
    """Stage export's scorer: logits (N, C) of the test rows, padded and batched as evaluate does;
    accuracy and f1_macro."""

    def __init__(self, params: Params) -> None:
        model, self.tokenizer = load_trained(params.paths.model)
        self.model = model.cpu()
        self.rows, data_labels = load_test_split(params.paths.processed)
        self.labels = model_labels(model.config, data_labels, params.paths.model)
        self.refs = np.array([r["labels"] for r in self.rows])
        typed = "token_type_ids" in self.tokenizer.model_input_names
        self.inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if typed else [])
        self.batch_size = params.export.batch_size
        self.manifest = {"max_length": params.prepare.max_length}

    def complete(self, batch) -> dict[str, np.ndarray]:
        """The graph's inputs from a padded batch; a missing token_type_ids is zeros, as BERT does."""
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        return {k: np.asarray(batch[k], dtype=np.int64) if k in batch else np.zeros_like(ids)
                for k in self.inputs}

    def feed(self, rows: list[dict]) -> dict[str, np.ndarray]:
        keys = [k for k in self.tokenizer.model_input_names if k in rows[0]]
        return self.complete(self.tokenizer.pad([{k: r[k] for k in keys} for r in rows],
                                                return_tensors="np"))

    def score(self, forward=None) -> tuple[dict, np.ndarray]:
        """Metrics and logits (N, C); forward None: the PyTorch model through evaluate's own code."""
        if forward is None:
            logits = predict_logits(self.model, self.tokenizer, self.rows, self.batch_size)
        else:
            logits = batched_logits(lambda b: forward(self.complete(b)), self.tokenizer,
                                    self.rows, self.batch_size, len(self.labels), "np")
        scores = compute_metrics(logits.argmax(axis=1), self.refs, self.labels)
        return {k: scores[k] for k in task(CLASSIFICATION).export_metrics}, logits

    @staticmethod
    def compare(ref: np.ndarray, out: np.ndarray) -> dict:
        return {"agreement": float((ref.argmax(axis=1) == out.argmax(axis=1)).mean()),
                "max_abs_logit_diff": float(np.abs(out - ref).max())}
