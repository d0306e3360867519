"""Active learning for stage select: which unlabelled rows a person should label next.

The trained classifier scores every row of the pool, and the rows it is least sure of come first
(``select.strategy``: margin, 1 - (p1 - p2) of its two likeliest labels; or entropy, H(p) / log C;
both in [0, 1], 1 the least sure). Going down that ranking, a row whose sentence embedding (the
configured encoder's, as the audit's) has a cosine similarity above ``select.max_similarity`` to a
row already chosen is skipped, so the ``top_n`` chosen are not near-duplicates of each other. The
chosen rows become Label Studio tasks with the model's prediction as a pre-annotation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmforge.common import DIGITS
from lmforge.data.labelstudio import make_task, row_id
from lmforge.params import Params

RANKING = "ranking.csv"  # in paths.select: the whole pool, least sure first
COLUMNS = ["rank", "row_id", "text", "predicted_label", "score", "uncertainty", "chosen",
           "near_duplicate_of"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, C); exp cannot overflow
    return shifted / shifted.sum(axis=1, keepdims=True)


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """(N,) in [0, 1], higher for a less sure prediction."""
    if strategy == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]  # (N, 2): second likeliest, likeliest
        return 1 - (top2[:, 1] - top2[:, 0])
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1)
    return entropy / np.log(probs.shape[1])


def choose(order: np.ndarray, vectors: np.ndarray | None, top_n: int,
           max_similarity: float | None) -> tuple[list[int], np.ndarray]:
    """Walk ``order`` (row indices, least sure first), keeping up to ``top_n`` rows no closer than
    ``max_similarity`` to one kept before; returns the kept indices and, per row, the kept row that
    made it a near-duplicate (-1: none)."""
    chosen: list[int] = []
    near = np.full(len(order), -1)
    for i in order:
        if len(chosen) == top_n:
            break
        if max_similarity is not None and chosen:
            sims = vectors[chosen] @ vectors[i]  # unit vectors: cosine similarities, (len(chosen),)
            j = int(sims.argmax())
            if sims[j] > max_similarity:
                near[i] = chosen[j]
                continue
        chosen.append(int(i))
    return chosen, near


def rank_pool(texts: list[str], probs: np.ndarray, vectors: np.ndarray | None, labels: list[str],
              params: Params) -> pd.DataFrame:
    """The pool, least sure first: COLUMNS, ``chosen`` marking the rows to label next."""
    cfg = params.select
    unsure = uncertainty(probs, cfg.strategy)
    order = np.argsort(-unsure, kind="stable")
    chosen, near = choose(order, vectors, cfg.top_n, cfg.max_similarity)
    ids = [row_id(t) for t in texts]
    predicted = probs.argmax(axis=1)
    table = pd.DataFrame({
        "rank": np.argsort(order) + 1, "row_id": ids, "text": texts,
        "predicted_label": [labels[p] for p in predicted],
        "score": probs.max(axis=1).round(DIGITS), "uncertainty": unsure.round(DIGITS),
        "chosen": np.isin(np.arange(len(texts)), chosen),
        "near_duplicate_of": [ids[j] if j >= 0 else "" for j in near],
    })
    return table.sort_values("rank").reset_index(drop=True)


def label_tasks(ranking: pd.DataFrame, text_key: str, model_version: str) -> list[dict]:
    """The chosen rows, least sure first, as Label Studio tasks with the model's prediction."""
    chosen = ranking[ranking["chosen"]]
    return [make_task(r.text, text_key, r.row_id, r.predicted_label, r.score, model_version)
            for r in chosen.itertuples(index=False)]


def predict(texts: list[str], params: Params) -> tuple[np.ndarray, list[str]]:
    """(N, C) probabilities of the trained model (paths.model) and its labels in id order."""
    from lmforge.classification.evaluate import load_trained, predict_logits

    model, tokenizer = load_trained(params.paths.model)
    rows = [tokenizer(t, truncation=True, max_length=params.prepare.max_length) for t in texts]
    logits = predict_logits(model, tokenizer, rows, params.select.batch_size)
    config = model.config
    return softmax(logits), [str(config.id2label[i]) for i in range(config.num_labels)]


def select(texts: list[str], params: Params) -> tuple[pd.DataFrame, list[str]]:
    """Rank the pool (``texts``); returns the ranking and the model's labels."""
    probs, labels = predict(texts, params)
    vectors = None
    if params.select.max_similarity is not None:
        from lmforge.classification.embed import embed, load_encoder

        encoder, tokenizer = load_encoder(params.model.source, params.model.trust_remote_code)
        vectors = embed(texts, encoder, tokenizer, params.prepare.max_length,
                        params.select.batch_size)
    return rank_pool(texts, probs, vectors, labels, params), labels
