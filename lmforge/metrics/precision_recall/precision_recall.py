"""Per-class precision, recall, F1 and support as one `evaluate` metric, from scikit-learn.

    from lmforge.metrics import load_metric
    load_metric("precision_recall").compute(predictions=p, references=r, labels=[0, 1, 2])

One call gives the whole per-class table (a classification report) from one pass over the data.
`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support

_DESCRIPTION = """
Per class c: precision = TP / (TP + FP) (of the rows predicted c, the share that are c),
recall = TP / (TP + FN) (of the rows that are c, the share predicted c), F1 = their harmonic mean,
and support = the number of rows whose reference is c. With `average` set, the three scores are
averaged over classes instead (support is then None).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): True class ids, one per prediction.
    labels (`list` of `int`): The classes to report, in order. Pass every class id so a class
        absent from the data still gets its row (scores 0, support 0). Default: the classes
        present, sorted.
    average (`str` or None): None (default) for one value per class; 'macro', 'micro' or
        'weighted' for averages.
    sample_weight (`list` of `float`): Weight of each example. Default None.
    zero_division (`float`): The score where a ratio is 0/0 (a class never predicted, or never
        true). Default 0.0 (and no warning).

Returns:
    precision, recall, f1 (`list` of `float`, one per label; a `float` when averaged),
    support (`list` of `int`, one per label; None when averaged).

Example:
    >>> pr = load_metric("precision_recall")
    >>> pr.compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1], labels=[0, 1, 2])
    {'precision': [0.5, 1.0, 0.0], 'recall': [1.0, 0.6666666666666666, 0.0],
     'f1': [0.6666666666666666, 0.8, 0.0], 'support': [1, 3, 0]}
"""

_CITATION = """
@article{scikit-learn,
    title={Scikit-learn: Machine Learning in {P}ython},
    author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B.
            and Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V.
            and Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M.
            and Duchesnay, E.},
    journal={Journal of Machine Learning Research},
    volume={12},
    pages={2825--2830},
    year={2011}
}
"""

_URL = "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_recall_fscore_support.html"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[_URL],
        )

    def _compute(self, predictions, references, labels=None, average=None, sample_weight=None,
                 zero_division=0.0):
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, average=average,
            sample_weight=sample_weight, zero_division=zero_division,
        )
        if average is not None:
            return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                    "support": None}
        # Plain Python numbers: results go straight into JSON metrics files.
        return {
            "precision": [float(x) for x in precision],
            "recall": [float(x) for x in recall],
            "f1": [float(x) for x in f1],
            "support": [int(x) for x in support],
        }
