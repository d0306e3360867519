"""Stage evaluate: score the trained model on the test split and add the scores to train's MLflow run.

    python -m stages.evaluate      # normally via `dvc repro evaluate`; reads `task`, `evaluate`, `paths`

Writes ``paths.eval_metrics``, the task's plot tables in ``paths.eval_plots`` and its per-example
reports in ``paths.eval_reports`` (lmforge/tasks.py names them). Classification:
lmforge/classification/evaluate.py (accuracy, F1, loss, per-class table, confusion matrix, the
misclassified rows the model was surest about); causal_lm: lmforge/causal_lm/evaluate.py
(perplexity of the trained and the starting model; BLEU/ROUGE of generations on pairs).
"""

from __future__ import annotations

from lmforge import tracking
from lmforge.alignment import with_scored_model
from lmforge.alignment.evaluate import add_alignment
from lmforge.common import run_main, write_aside
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    before_align, params = params, with_scored_model(params)  # align's model, when it wrote one
    paths = params.paths
    tracking.run_id(paths.run_info)  # fail before the slow part when train never ran
    if params.task == CAUSAL_LM:
        from lmforge.causal_lm.evaluate import evaluate
    else:
        from lmforge.classification.evaluate import evaluate
    print(f"evaluate: {params.task}, {paths.model} on the test split", flush=True)
    # The task writes into staged copies of its three outputs, swapped in together when it
    # succeeds: a failed evaluation leaves the last good metrics, plots and reports as they were.
    with write_aside(paths.eval_metrics, paths.eval_plots, paths.eval_reports) as staged:
        metrics, plots, reports = staged
        plots.mkdir()
        reports.mkdir()
        aside = paths.model_copy(update={"eval_metrics": metrics, "eval_plots": plots,
                                         "eval_reports": reports})
        result = evaluate(params.model_copy(update={"paths": aside}))
        result |= add_alignment(before_align, metrics)  # before/after align; {} when it was off
    print(f"evaluate: -> {paths.eval_metrics}, {paths.eval_plots}, {paths.eval_reports}")
    return result


if __name__ == "__main__":
    run_main(main)
