"""causal_lm for stage export: the test rows scored by perplexity through PyTorch or an ONNX
runner, on exactly the rows and masking stage evaluate uses."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.causal_lm.evaluate import load_test_rows, load_trained, pad_right, rows_nll, sequence_nll
from lmforge.metrics import load_metric
from lmforge.onnx import logits_only, torch_forward
from lmforge.params import Params


class ExportScorer:
    """Stage export's scorer: per-row NLL of the test rows (prompt tokens of pairs masked, as
    evaluate); perplexity.

    The logit difference is taken on the first ``export.batch_size`` rows (real tokens only): the
    logits of every row, (N, T, vocab), are too big to keep for a comparison.
    """

    def __init__(self, params: Params) -> None:
        model, self.tokenizer, meta = load_trained(params.paths.model)
        self.model = model.cpu()
        self.rows = load_test_rows(params.paths.processed, meta["format"] != "text")
        self.inputs = ["input_ids", "attention_mask"]
        self.batch_size = params.export.batch_size
        self.manifest = {}

    def feed(self, rows: list[dict]) -> dict[str, np.ndarray]:
        batch = pad_right(rows, self.tokenizer.pad_token_id)
        return {k: batch[k].numpy() for k in self.inputs}

    def score(self, forward=None) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """Perplexity, and the logits (B, T, V) and mask (B, T) of the first batch."""
        pad = self.tokenizer.pad_token_id
        if forward is None:
            nll, tokens = sequence_nll(self.model, self.rows, self.batch_size, pad)
            forward = torch_forward(logits_only(self.model, causal=True), self.inputs)
        else:
            nll, tokens = rows_nll(
                lambda ids, mask: torch.from_numpy(forward({"input_ids": ids.numpy(),
                                                            "attention_mask": mask.numpy()})),
                self.rows, self.batch_size, pad)
        ppl = load_metric("perplexity").compute(nll=nll.tolist(), tokens=tokens.tolist())
        first = self.feed(self.rows[: self.batch_size])
        return {"perplexity": ppl["perplexity"]}, (forward(first), first["attention_mask"])

    @staticmethod
    def compare(ref: tuple, out: tuple) -> dict:
        real = ref[1].astype(bool)  # padding positions are whatever the graph makes of them
        return {"max_abs_logit_diff": float(np.abs(out[0] - ref[0])[real].max())}
