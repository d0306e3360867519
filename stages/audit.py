"""Stage audit: which labels are probably wrong (task classification), checked before anything trains.

    python -m stages.audit         # normally via `dvc repro audit`; reads `audit`, `model`, `prepare`

Audits every labelled row of the cleaned splits (lmforge/classification/audit.py: cleanlab on the
out-of-fold probabilities of a cheap model). Writes ``paths.audit``, a DVC metric (rows flagged
overall and per class, the estimated noise rate, each class's label quality), and
``paths.audit_report``: ``label_issues.csv`` (every row, worst label first: row id, split, text,
given and suggested label, label quality score, flagged) and the flagged rows as a Label Studio
project to check them in (``tasks.json``, the suggested label pre-annotated, and ``config.xml``).
Both are written before ``audit.max_noise_rate`` is judged: above it the stage fails, and since
prepare depends on the metric, nothing trains on the data. ``audit.enabled: false`` or task
causal_lm: the metric says ``enabled: false`` and nothing is audited.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmforge.common import SPLITS, UserError, run_main, write_aside, write_json
from lmforge.data.cleaning import label_set
from lmforge.data.labelstudio import labelling_config, row_id
from lmforge.params import Params, load_params
from lmforge.tasks import CLASSIFICATION

TASKS, CONFIG = "tasks.json", "config.xml"  # a Label Studio project: import these two


def read_rows(interim: Path, text_column: str, label_column: str) -> pd.DataFrame:
    """Every labelled row of the splits: row_id, split, text, label."""
    missing = [str(interim / f"{s}.parquet") for s in SPLITS if not (interim / f"{s}.parquet").exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: run `dvc repro ingest` first")
    frames = []
    for split in SPLITS:
        df = pd.read_parquet(interim / f"{split}.parquet")
        frames.append(pd.DataFrame({"split": split, "text": df[text_column].astype(str),
                                    "label": df[label_column].astype(str)}))
    rows = pd.concat(frames, ignore_index=True)
    return rows.assign(row_id=rows["text"].map(row_id))


def write_outputs(params: Params, metrics: dict, report: pd.DataFrame | None, tasks: list,
                  labels: list[str]) -> None:
    """The metric and the report folder, swapped in together (a crash keeps the last good ones)."""
    from lmforge.classification.audit import REPORT

    paths = params.paths
    with write_aside(paths.audit, paths.audit_report) as (metric_file, folder):
        folder.mkdir()
        if report is not None:
            report.to_csv(folder / REPORT, index=False)
            write_json(folder / TASKS, tasks)
            (folder / CONFIG).write_text(labelling_config(labels, params.data.text_column))
        write_json(metric_file, metrics)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    cfg, data, paths = params.audit, params.data, params.paths
    if params.task != CLASSIFICATION or not cfg.enabled:
        write_outputs(params, {"enabled": False}, None, [], [])
        print(f"audit: off (task {params.task}, audit.enabled {cfg.enabled}) -> {paths.audit}")
        return {"enabled": False}
    from lmforge.classification.audit import REPORT, audit, relabel_tasks

    rows = read_rows(paths.interim, data.text_column, data.label_column)
    labels = label_set(rows.loc[rows["split"] == "train", "label"], data.labels)
    report, metrics = audit(rows, labels, params)
    write_outputs(params, metrics, report, relabel_tasks(report, data.text_column, cfg.features),
                  labels)
    where = paths.audit_report / REPORT
    print(f"audit: {metrics['flagged']} of {metrics['rows']} labels flagged, estimated noise rate "
          f"{metrics['noise_rate']:.3f} -> {paths.audit}, {where}")
    bound = cfg.max_noise_rate
    if bound is not None and metrics["noise_rate"] > bound:
        raise UserError(
            f"audit: the estimated label noise rate {metrics['noise_rate']:.3f} is above "
            f"audit.max_noise_rate ({bound}): {metrics['flagged']} rows flagged; fix them (see "
            f"{where}, or import {paths.audit_report / TASKS} into Label Studio), or raise the bound")
    return metrics


if __name__ == "__main__":
    run_main(main)
