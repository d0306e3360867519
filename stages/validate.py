"""Stage validate: check the cleaned splits with a Great Expectations suite before anything trains.

    python -m stages.validate      # normally via `dvc repro validate`

Every check has a stable name ``<split>/<check>`` (``train/text_not_null``,
``test/no_leakage_from_train``). The verdict goes to ``paths.validation`` (a DVC metric); the GX
Data Docs and ``summary.html`` (every check on one page that needs no network) to
``paths.data_docs``; then a failed check stops the pipeline with a summary naming each failed
check, its unexpected count and example values, and the page.

Task causal_lm has no label checks. On prompt/response pairs the text checks apply to each of
``prompt`` and ``response`` (``validation/prompt_length``, ``test/response_not_blank``), duplicates
are repeated pairs, and leakage is a validation/test prompt also in train (a test prompt seen in
training inflates BLEU).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmforge.common import SPLITS, UserError, run_main, write_json
from lmforge.data.chat_checks import chat_suite
from lmforge.data.checks import BALANCE, build_checks, derive_frames
from lmforge.data.cleaning import label_set
from lmforge.data.expectations import build_docs, make_context, validate_tables
from lmforge.data.summary import write_summary
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM


def run_suite(frames: dict[str, pd.DataFrame], params: Params, docs_dir: Path | None = None):
    """Validate the splits (``frames`` holds train, validation, test); Data Docs go to docs_dir.

    Returns {"success", "checks_failed", "label_set", "checks": {name: {success, unexpected_count,
    expectation, column, expected, examples, error}}}, checks in a stable order; label_set is None for
    causal_lm.
    """
    train, label = frames["train"], params.data.label_column
    if params.task == CAUSAL_LM:
        labels = None
    else:
        labels = label_set(train[label].dropna() if label in train else [], params.data.labels)
    if params.data.chat is not None:  # conversations: lmforge/data/chat_checks.py
        derived, checks = chat_suite(frames, params)
    else:
        derived = derive_frames(frames, params, labels)
        checks = build_checks(derived, params, labels)
    context = make_context()
    results = validate_tables(context, derived, checks, params.validate_.examples,
                              index_columns={BALANCE: ["class"]})
    if docs_dir is not None:
        build_docs(context, docs_dir)
    ordered = {name: results[name] for named in checks.values() for name, _ in named}
    failed = sum(not c["success"] for c in ordered.values())
    return {"success": failed == 0, "checks_failed": failed, "label_set": labels, "checks": ordered}


def as_metrics(report: dict) -> dict:
    """The report as a DVC metric: the verdict and one unexpected-row count per check.

    Only numbers: the expectation behind each check and its examples are in the Data Docs, and
    strings or lists would add unparseable columns to every `dvc metrics show` / `dvc exp show`.
    """
    counts = {name: c["unexpected_count"] for name, c in report["checks"].items()}
    return {"success": report["success"], "checks_failed": report["checks_failed"], "checks": counts}


def short(value) -> str:
    """An example as the terminal shows it: a long text is cut, with its length said."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(str(value))} chars)"


def failure_summary(report: dict, where: list[Path]) -> str:
    """What a human reads in the terminal: each failed check, its count, examples, the report."""
    lines = [f"validation failed: {report['checks_failed']} of {len(report['checks'])} checks"]
    for name, c in report["checks"].items():
        if not c["success"]:
            what = f"{c['expectation']}({c['column']})"
            lines.append(f"  {name}: {c['unexpected_count']} unexpected [{what}]")
            if c["examples"]:
                shown = dict.fromkeys(map(short, c["examples"]))  # a repeated text is shown once
                lines.append("      e.g. " + ", ".join(shown))
            if c["error"]:
                lines.append(f"      {c['error']}")
    return "\n".join([*lines, "full report: " + ", ".join(str(p) for p in where)])


def read_splits(interim: Path) -> dict[str, pd.DataFrame]:
    missing = [str(interim / f"{s}.parquet") for s in SPLITS]
    missing = [p for p in missing if not Path(p).exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: run `dvc repro ingest` first")
    return {s: pd.read_parquet(interim / f"{s}.parquet") for s in SPLITS}


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    frames = read_splits(paths.interim)
    report = run_suite(frames, params, docs_dir=paths.data_docs)
    write_json(paths.validation, as_metrics(report))  # written, and docs built, even on failure
    summary = write_summary(report, paths.data_docs)  # readable offline, unlike the Data Docs
    if not report["success"]:
        raise UserError(failure_summary(report, [summary, paths.validation]))
    rows = {s: len(df) for s, df in frames.items()}
    print(f"validate: all {len(report['checks'])} checks passed on {rows} rows; report: {summary}")
    return report


if __name__ == "__main__":
    run_main(main)
