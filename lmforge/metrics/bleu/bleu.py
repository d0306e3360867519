"""Corpus BLEU as an `evaluate` metric, computed by sacrebleu, loadable offline from this folder.

    from lmforge.metrics import load_metric
    load_metric("bleu").compute(predictions=["the cat sat"], references=["the cat sat down"])

`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
BLEU compares n-grams (1 to 4) of each prediction with those of its reference(s): the geometric
mean of the four modified n-gram precisions, pooled over the whole corpus, times a brevity penalty
for predictions shorter than their references. sacrebleu tokenizes itself (13a by default), so
scores are comparable across papers and runs. 100 is a perfect match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated texts.
    references (`list` of `str`, or `list` of `list` of `str`): One reference per prediction, or
        several (every prediction the same number).
    smooth_method (`str`): 'exp' (default), 'floor', 'add-k' or 'none'.
    smooth_value (`float`): For 'floor' and 'add-k'. Default None (sacrebleu's).
    lowercase (`bool`): Compare lowercased. Default False.
    tokenize (`str`): sacrebleu tokenizer ('13a', 'intl', 'char', 'zh', ...). Default '13a'.
    use_effective_order (`bool`): Skip n-gram orders with no match (sentence-level use). Default False.

Returns:
    score (`float`): corpus BLEU, 0 to 100.
    counts, totals (`list` of `int`): matching and total n-grams per order 1-4.
    precisions (`list` of `float`): the modified n-gram precisions, 0 to 100.
    bp (`float`): brevity penalty. sys_len, ref_len (`int`): prediction and reference lengths.

Example:
    >>> load_metric("bleu").compute(predictions=["hello there general kenobi"],
    ...                             references=["hello there general kenobi"])["score"]
    100.00000000000004
"""

_CITATION = """
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W18-6319",
    pages = "186--191",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first schema the inputs fit: several references, then one.
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, smooth_method="exp", smooth_value=None,
                 lowercase=False, tokenize="13a", use_effective_order=False):
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        per_prediction = {len(r) for r in references}
        if len(per_prediction) > 1:
            raise ValueError("bleu: every prediction needs the same number of references")
        # sacrebleu wants one stream per reference position: streams[k][i] is row i's k-th reference.
        streams = [[refs[k] for refs in references] for k in range(per_prediction.pop())]
        out = sacrebleu.corpus_bleu(predictions, streams, smooth_method=smooth_method,
                                    smooth_value=smooth_value, lowercase=lowercase,
                                    tokenize=tokenize, use_effective_order=use_effective_order)
        return {"score": float(out.score), "counts": list(out.counts), "totals": list(out.totals),
                "precisions": [float(p) for p in out.precisions], "bp": float(out.bp),
                "sys_len": int(out.sys_len), "ref_len": int(out.ref_len)}
