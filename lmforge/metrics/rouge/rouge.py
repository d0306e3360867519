"""ROUGE-1/2/L as an `evaluate` metric, computed by rouge-score, loadable offline from this folder.

    from lmforge.metrics import load_metric
    load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat sat down"])

`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE compares a prediction with its reference by overlapping units: rouge1 unigrams, rouge2
bigrams, rougeL the longest common subsequence of words. Each pair gets an F-measure (harmonic mean
of overlap/prediction and overlap/reference); the result is the mean over pairs, 0 to 1.
rouge-score's tokenizer lowercases and keeps only ASCII letters and digits, so text in other
scripts scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated texts.
    references (`list` of `str`, or `list` of `list` of `str`): One reference per prediction, or
        several (a pair then scores against its best-matching reference).
    rouge_types (`list` of `str`): Default ['rouge1', 'rouge2', 'rougeL'].
    use_stemmer (`bool`): Porter-stem words before matching. Default False.

Returns:
    One `float` per rouge type: the mean F-measure over pairs, 0 to 1.

Example:
    >>> load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat sat"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0}
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=ROUGE_TYPES, use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        totals = dict.fromkeys(rouge_types, 0.0)
        for pred, ref in zip(predictions, references, strict=True):
            scores = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(ref, pred)
            for t in rouge_types:
                totals[t] += scores[t].fmeasure
        n = max(len(predictions), 1)  # no pairs: every mean is 0, not a division error
        return {t: totals[t] / n for t in rouge_types}
