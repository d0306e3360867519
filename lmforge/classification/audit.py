"""Label audit for stage audit: which labels of a classification set are probably wrong.

A cheap model scores every row without having seen it: k-fold cross-validation of one logistic
regression per view of the text (``audit.features``: the configured encoder's sentence embeddings,
word 1-2-gram TF-IDF), their out-of-fold probabilities averaged. cleanlab's confident learning then
estimates the joint distribution of given and true labels (the noise rate is its off-diagonal
mass), flags the rows whose given label is likely wrong, and scores each row's label quality (the
probability the cheap model gives the given label: cleanlab's self-confidence).

Why both views: on the shipped sample (80 of 1,600 labels flipped by its generator) the encoder
alone flags 231 rows at precision 0.23 and recall 0.68, TF-IDF alone 124 at 0.48 and 0.74, the two
averaged 120 at 0.49 and 0.74. The sample is built from word lists, which suits TF-IDF; on real text
the encoder carries the meaning of words TF-IDF has never seen.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmforge.common import DIGITS, UserError, rounded
from lmforge.data.labelstudio import make_task
from lmforge.params import Params

REPORT = "label_issues.csv"  # in paths.audit_report, beside the Label Studio tasks of flagged rows


def check_folds(labels: pd.Series, folds: int) -> None:
    """Every class needs a row in each fold, or a fold's model cannot score it."""
    counts = labels.value_counts()
    small = counts[counts < folds]
    if len(small):
        raise UserError(f"audit: {len(small)} class(es) have fewer rows than audit.folds ({folds}): "
                        f"{small.to_dict()}; lower audit.folds, add rows, or set audit.enabled: false")


def classifier(view: str):
    """One view's model; C is sklearn's default 1.0, not tuned on the sample's answer key."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    regression = LogisticRegression(max_iter=2000)
    if view == "tfidf":  # fitted inside each fold, so no held-out word reaches the vocabulary
        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), regression)
    return regression


def out_of_fold(views: dict[str, np.ndarray], y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N, C) probabilities, each row's from the models of the fold that held it out, averaged
    over the views (encoder: (N, H) embeddings; tfidf: the N texts)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = [cross_val_predict(classifier(name), x, y, cv=cv, method="predict_proba")
             for name, x in views.items()]
    return np.mean(probs, axis=0)


def find_issues(y: np.ndarray, probs: np.ndarray, threshold: float | None):
    """(label quality (N,), flagged (N,) bool): cleanlab's confident-learning flags, or quality
    below ``threshold``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(y, probs)  # self-confidence: probs[i, y[i]]
    if threshold is not None:
        return quality, quality < threshold
    return quality, find_label_issues(y, probs, n_jobs=1)  # n_jobs=1: no process pool on 2 cores


def summarize(y: np.ndarray, probs: np.ndarray, flagged: np.ndarray, labels: list[str]) -> dict:
    """The audit metric: flagged rows overall and per class, the estimated noise rate, and each
    class's label quality (cleanlab: the share of its given labels estimated right)."""
    from cleanlab.count import estimate_joint
    from cleanlab.dataset import rank_classes_by_label_quality

    joint = estimate_joint(y, probs)  # (C, C): P(given label, true label)
    by_class = rank_classes_by_label_quality(labels=y, pred_probs=probs).set_index("Class Index")
    per_class = {name: {"rows": int((y == c).sum()), "flagged": int(flagged[y == c].sum()),
                        "label_quality": float(by_class.loc[c, "Label Quality Score"])}
                 for c, name in enumerate(labels)}
    return rounded({
        "enabled": True, "rows": len(y), "flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()), "noise_rate": float(1 - np.trace(joint)),
        "oof_accuracy": float((probs.argmax(axis=1) == y).mean()), "per_class": per_class,
    })


def views_of(texts: list[str], params: Params) -> dict[str, np.ndarray]:
    """The inputs of each view in ``audit.features``."""
    views = {}
    if "encoder" in params.audit.features:
        from lmforge.classification.embed import embed, load_encoder

        model, tokenizer = load_encoder(params.model.source, params.model.trust_remote_code)
        views["encoder"] = embed(texts, model, tokenizer, params.prepare.max_length,
                                 params.audit.batch_size)
    if "tfidf" in params.audit.features:
        views["tfidf"] = np.asarray(texts, dtype=object)
    return views


def audit(rows: pd.DataFrame, labels: list[str], params: Params) -> tuple[pd.DataFrame, dict]:
    """Audit ``rows`` (row_id, split, text, label): the report, worst label first, and the metric.

    ``labels``: the label set in id order (the rows' labels must be in it).
    """
    cfg = params.audit
    check_folds(rows["label"], cfg.folds)
    present = [name for name in labels if name in set(rows["label"])]
    y = rows["label"].map({name: i for i, name in enumerate(present)}).to_numpy()
    probs = out_of_fold(views_of(rows["text"].tolist(), params), y, cfg.folds, cfg.seed)
    quality, flagged = find_issues(y, probs, cfg.threshold)
    suggested = probs.argmax(axis=1)
    report = pd.DataFrame({
        "row_id": rows["row_id"], "split": rows["split"], "text": rows["text"],
        "given_label": rows["label"], "suggested_label": [present[i] for i in suggested],
        "label_quality": quality.round(DIGITS),
        "suggested_score": probs[np.arange(len(y)), suggested].round(DIGITS), "flagged": flagged,
    })
    report = report.sort_values("label_quality", kind="stable").reset_index(drop=True)
    return report, summarize(y, probs, flagged, present)


def relabel_tasks(report: pd.DataFrame, text_key: str, features: list[str]) -> list[dict]:
    """The flagged rows as Label Studio tasks, the suggested label pre-annotated with its score."""
    version = "lmforge-audit-" + "+".join(features)
    flagged = report[report["flagged"]]
    return [make_task(r.text, text_key, r.row_id, r.suggested_label, r.suggested_score, version)
            for r in flagged.itertuples(index=False)]
