"""Stage select: the unlabelled rows to label next (task classification), after train.

    python -m stages.select        # normally via `dvc repro select`; reads `select`, `model`, `prepare`

Ranks the pool ingest kept aside (``<interim>/unlabeled.parquet``: rows without a label) by the
trained model's uncertainty, skips near-duplicates of rows already chosen, and writes
``paths.select``: ``tasks.json`` (the ``select.top_n`` chosen rows as Label Studio tasks, the
model's prediction pre-annotated with its score and the model's version), ``config.xml`` (the
labelling config for the model's labels) and ``ranking.csv`` (the whole pool, least sure first).
Library: lmforge/classification/select.py. An empty pool, or task causal_lm, writes an empty
ranking and no tasks, without loading a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmforge.common import run_main, sha256_of, write_aside, write_json
from lmforge.data.labelstudio import labelling_config
from lmforge.data.sources import UNLABELED
from lmforge.params import Params, load_params
from lmforge.tasks import CLASSIFICATION

TASKS, CONFIG = "tasks.json", "config.xml"  # a Label Studio project: import these two


def read_pool(interim: Path, text_column: str) -> list[str]:
    """The texts to rank; none when ingest kept no row aside (or ran before it kept any)."""
    path = interim / f"{UNLABELED}.parquet"
    return pd.read_parquet(path)[text_column].astype(str).tolist() if path.exists() else []


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    texts = read_pool(paths.interim, params.data.text_column) if params.task == CLASSIFICATION else []
    from lmforge.classification.select import COLUMNS, RANKING, label_tasks, select

    ranking, tasks, labels = pd.DataFrame(columns=COLUMNS), [], None
    if texts:
        ranking, labels = select(texts, params)
        version = f"lmforge-{sha256_of(paths.model)[:12]}"  # the weights' content: one per model
        tasks = label_tasks(ranking, params.data.text_column, version)
    with write_aside(paths.select) as (folder,):
        folder.mkdir()
        ranking.to_csv(folder / RANKING, index=False)
        write_json(folder / TASKS, tasks)
        if labels is not None:
            (folder / CONFIG).write_text(labelling_config(labels, params.data.text_column))
    summary = {"pool": len(texts), "chosen": len(tasks)}
    print(f"select: {summary['chosen']} of {summary['pool']} unlabelled rows to label next -> "
          f"{paths.select / TASKS}")
    return summary


if __name__ == "__main__":
    run_main(main)
