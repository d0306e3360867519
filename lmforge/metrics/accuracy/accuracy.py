"""Accuracy as an `evaluate` metric, computed by scikit-learn, loadable offline from this folder.

    from lmforge.metrics import load_metric
    load_metric("accuracy").compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])  # 0.75

`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the share of predictions that equal their reference:
Accuracy = (TP + TN) / (TP + TN + FP + FN), or, with `normalize=False`, the count of correct ones.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): True class ids, one per prediction.
    normalize (`bool`): True (default) returns the share of correct predictions, False their count.
    sample_weight (`list` of `float`): Weight of each example; None (default) weighs all equally.

Returns:
    accuracy (`float`): in [0, 1] with `normalize=True`, else the (weighted) number of correct rows.

Example:
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    {'accuracy': 0.75}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(
            references, predictions, normalize=normalize, sample_weight=sample_weight
        )
        return {"accuracy": float(score)}
