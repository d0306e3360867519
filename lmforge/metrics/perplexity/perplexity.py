"""Perplexity as an `evaluate` metric, from per-sequence summed NLL and target-token counts.

    from lmforge.metrics import load_metric
    load_metric("perplexity").compute(nll=[2.0, 6.0], tokens=[1, 3])  # exp(8 / 4) = 7.389...

The model is run by the caller (lmforge.causal_lm.evaluate): this metric only pools what it measured, so it
stays cheap and needs no model id (unlike the hub's `perplexity`, which downloads and runs one).
`evaluate` copies this script into its modules cache and imports it from there, so it must stay
self-contained: no imports from `stages`.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity = exp(sum of the per-token negative log-likelihoods / number of target tokens), the
exponent of the token-weighted mean NLL. Every token weighs the same, so a long sequence counts more
than a short one; this is not the mean of the per-sequence perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): Per sequence, the summed negative log-likelihood of its target tokens,
        in nats (natural log).
    tokens (`list` of `int`): Per sequence, how many target tokens that sum covers.

Returns:
    perplexity (`float`): exp(loss); inf when that overflows a float.
    loss (`float`): sum(nll) / sum(tokens), the mean NLL per target token, in nats.
    tokens (`int`): sum(tokens).

Example:
    >>> load_metric("perplexity").compute(nll=[2.0, 6.0], tokens=[1, 3])
    {'perplexity': 7.38905609893065, 'loss': 2.0, 'tokens': 4}
"""

_CITATION = """
@article{jelinek1977perplexity,
    title={Perplexity--a measure of the difficulty of speech recognition tasks},
    author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
    journal={The Journal of the Acoustical Society of America},
    volume={62},
    number={S1},
    pages={S63--S63},
    year={1977}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}
            ),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll, tokens):
        total = int(sum(tokens))
        if total <= 0:
            raise ValueError("perplexity: no target tokens (every count is 0), so no mean NLL")
        loss = math.fsum(nll) / total
        try:
            perplexity = math.exp(loss)
        except OverflowError:  # loss > ~709 nats: a float cannot hold it
            perplexity = math.inf
        return {"perplexity": perplexity, "loss": loss, "tokens": total}
