"""F1 score as an `evaluate` metric, computed by scikit-learn, loadable offline from this folder.

    from lmforge.metrics import load_metric
    load_metric("f1").compute(predictions=p, references=r, average="macro")

`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * P * R / (P + R).
For several classes it is computed per class and then averaged (macro, weighted) or computed from
the pooled counts (micro, which equals accuracy for single-label data).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): True class ids, one per prediction.
    average (`str` or None): 'binary' (default: the `pos_label` class only; two classes),
        'macro' (unweighted mean over classes), 'micro' (from pooled counts),
        'weighted' (mean weighted by each class's support), or None (one score per class,
        in the order of `labels`).
    labels (`list` of `int`): The classes to score, in order. Pass every class id so a class
        absent from both lists still counts (as 0) in a macro mean and gets its own entry with
        `average=None`. Default: the classes present, sorted.
    pos_label (`int`): The positive class when `average='binary'`. Default 1.
    sample_weight (`list` of `float`): Weight of each example. Default None.
    zero_division (`float`): The score of a class with no predicted and no true rows, where
        F1 is 0/0. Default 0.0 (and no warning).

Returns:
    f1 (`float`, or `list` of `float` when `average=None`): each in [0, 1], higher is better.

Example:
    >>> f1 = load_metric("f1")
    >>> f1.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average=None)
    {'f1': [0.8, 0.0, 0.0]}
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
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
        )

    def _compute(self, predictions, references, average="binary", labels=None, pos_label=1,
                 sample_weight=None, zero_division=0.0):
        score = f1_score(
            references, predictions, average=average, labels=labels, pos_label=pos_label,
            sample_weight=sample_weight, zero_division=zero_division,
        )
        # Plain Python numbers: results go straight into JSON metrics files.
        return {"f1": float(score) if average is not None else [float(s) for s in score]}
