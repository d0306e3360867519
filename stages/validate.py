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

from lmforge.alignment.checks import with_same_answers
from lmforge.common import SPLITS, UserError, run_main, write_json
from lmforge.data.chat_checks import chat_suite
from lmforge.data.checks import (
    BALANCE,
    balance_checks,
    balance_table,
    build_checks,
    derive_frames,
    split_checks,
    train_keys,
    with_derived,
)
from lmforge.data.cleaning import label_set
from lmforge.data.expectations import build_docs, make_context, validate_tables
from lmforge.data.hashing import SeenRows
from lmforge.data.shards import count_rows, read_batches, split_path
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


def merge_outcome(total: dict | None, part: dict, examples: int) -> dict:
    """One check over two batches: counts add up, examples fill up, an error is kept."""
    if total is None:
        return dict(part)
    return {**total, "success": total["success"] and part["success"],
            "unexpected_count": total["unexpected_count"] + part["unexpected_count"],
            "examples": (total["examples"] + part["examples"])[:examples],
            "error": total["error"] or part["error"]}


def run_batched(interim: Path, params: Params, docs_dir: Path | None = None) -> dict:
    """run_suite for splits larger than a batch: each split checked ``data.batch_rows`` rows at a
    time, counts summed per check, so memory holds one batch (and the hashes of train's texts, for
    leakage). Same checks, names and report; the Data Docs show one run per batch."""
    data, examples = params.data, params.validate_.examples
    label = data.label_column

    def batches(split: str, columns: list[str] | None = None):
        return read_batches(split_path(interim, split), data.batch_rows, columns)

    counts, train_rows, has_label = pd.Series(dtype="int64"), 0, False
    for df in batches("train"):
        train_rows += len(df)
        if label in df:
            has_label = True
            counts = counts.add(df[label].value_counts(), fill_value=0).astype("int64")
    labels = None if params.task == CAUSAL_LM else label_set(list(counts.index), data.labels)
    keys = train_keys(batches("train"), params)
    context, results, rows, order = make_context(), {}, {}, []
    for split in SPLITS:
        seen = SeenRows()
        for i, df in enumerate(batches(split)):
            derived = with_same_answers(with_derived(df, seen, keys if split != "train" else None,
                                                     params), data)
            table = split if i == 0 else f"{split} #{i + 1}"
            named = {table: split_checks(split, derived.columns, params, labels)}
            order += [name for name, _ in named[table] if name not in order]
            for name, part in validate_tables(context, {table: derived}, named, examples).items():
                results[name] = merge_outcome(results.get(name), part, examples)
                rows[name] = rows.get(name, 0) + len(df)
    for name, c in results.items():  # a share ("mostly") holds over the whole split, not per batch
        if "mostly" in c["expected"]:
            c["success"] = 1 - c["unexpected_count"] / max(rows[name], 1) >= c["expected"]["mostly"]
    balance = balance_checks(params)
    if params.task != CAUSAL_LM and has_label and balance:
        table = {BALANCE: balance_table(counts, labels, train_rows)}
        results |= validate_tables(context, table, {BALANCE: balance}, examples,
                                   index_columns={BALANCE: ["class"]})
        order += [name for name, _ in balance]
    if docs_dir is not None:
        build_docs(context, docs_dir)
    results = {name: results[name] for name in order}
    failed = sum(not c["success"] for c in results.values())
    return {"success": failed == 0, "checks_failed": failed, "label_set": labels, "checks": results}


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


def require_splits(interim: Path) -> dict[str, int]:
    """Rows per split; a split ingest has not written is an error naming it."""
    missing = [str(split_path(interim, s)) for s in SPLITS if not split_path(interim, s).exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: run `dvc repro ingest` first")
    return {s: count_rows(split_path(interim, s)) for s in SPLITS}


def check_splits(params: Params) -> dict:
    """The report, by the engine and the way that fit: Spark; in memory when every split fits one
    batch (or for conversations); else batch by batch."""
    interim, docs = params.paths.interim, params.paths.data_docs
    rows = require_splits(interim)
    if params.data.engine == "spark":
        from lmforge.data.spark import spark_validate

        return spark_validate(params, interim, docs)
    if params.data.chat is not None or max(rows.values()) <= params.data.batch_rows:
        frames = {s: pd.read_parquet(split_path(interim, s)) for s in SPLITS}
        return run_suite(frames, params, docs_dir=docs)
    return run_batched(interim, params, docs_dir=docs)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    report = check_splits(params)
    write_json(paths.validation, as_metrics(report))  # written, and docs built, even on failure
    summary = write_summary(report, paths.data_docs)  # readable offline, unlike the Data Docs
    if not report["success"]:
        raise UserError(failure_summary(report, [summary, paths.validation]))
    rows = require_splits(paths.interim)
    print(f"validate: all {len(report['checks'])} checks passed on {rows} rows; report: {summary}")
    return report


if __name__ == "__main__":
    run_main(main)
