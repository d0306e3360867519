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

from lmforge.alignment.checks import same_answer_checks, with_same_answers
from lmforge.common import SPLITS, UserError, run_main, write_json
from lmforge.data.chat_checks import chat_suite
from lmforge.data.cleaning import label_set
from lmforge.data.expectations import build_docs, make_context, validate_tables
from lmforge.data.summary import write_summary
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM

# Checks GX has no expectation for are computed by pandas into a column that holds the offending
# text and is null elsewhere; "values must be null" then lets GX count the rows and show examples.
REPEATS = "text_repeats_earlier_row"
LEAKED = "text_also_in_train"
PAIR_REPEATS = "pair_repeats_earlier_row"  # causal_lm pairs: the repeated pair's prompt is shown
PROMPT_LEAKED = "prompt_also_in_train"
# One row per class of the label set (zero counts included), for the train class-balance checks.
BALANCE = "train_class_balance"


def text_roles(params: Params) -> dict[str, str]:
    """Check-name prefix -> column of each text column: {"text": ...} or {"prompt": .., "response": ..}."""
    data = params.data
    if params.task == CAUSAL_LM and data.pairs:
        rejected = {"rejected": data.rejected_column} if data.rejected_column else {}  # preferences
        return {"prompt": data.prompt_column, "response": data.response_column, **rejected}
    return {"text": data.text_column}


def derived_names(params: Params) -> tuple[str, str]:
    """The derived columns behind duplicate_share and no_leakage_from_train."""
    return (PAIR_REPEATS, PROMPT_LEAKED) if "prompt" in text_roles(params) else (REPEATS, LEAKED)


def with_derived(df: pd.DataFrame, train: pd.DataFrame, is_train: bool, params: Params) -> pd.DataFrame:
    """A split plus its repeats column and (validation/test) its leakage column.

    Each holds the key text (the text, or a pair's prompt) where the row repeats / leaks, else null.
    """
    columns = list(text_roles(params).values())
    if not set(columns) <= set(df.columns):
        return df
    repeats, leaked = derived_names(params)
    key = df[columns[0]]
    df = df.assign(**{repeats: key.where(df.duplicated(subset=columns))})
    if not is_train and columns[0] in train:  # a hash lookup: ~10 ms against 67k texts
        df[leaked] = key.where(key.isin(train[columns[0]].dropna()))
    return df


def derive_frames(frames: dict[str, pd.DataFrame], params: Params, labels: list[str]) -> dict:
    """The tables GX validates: each split plus the derived columns, and the class-balance table."""
    label, train = params.data.label_column, frames["train"]
    out = {s: with_same_answers(with_derived(df, train, s == "train", params), params.data)
           for s, df in frames.items()}
    if params.task != CAUSAL_LM and label in train:
        rows = train[label].value_counts().reindex(labels, fill_value=0).to_numpy()
        shares = rows / max(len(train), 1)
        out[BALANCE] = pd.DataFrame({"class": labels, "rows": rows, "share": shares})
    return out


def text_checks(role: str, column: str, params: Params) -> list[tuple]:
    """Not null, not blank and (when bounded) length, for one text column present in the split."""
    from great_expectations import expectations as gxe

    v = params.validate_
    checks = [
        (f"{role}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column)),
        (f"{role}_not_blank", gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$")),
    ]
    if v.min_text_chars is not None or v.max_text_chars is not None:
        length = gxe.ExpectColumnValueLengthsToBeBetween(
            column=column, min_value=v.min_text_chars, max_value=v.max_text_chars
        )
        checks.append((f"{role}_length", length))
    return checks


def split_checks(split: str, columns, params: Params, labels: list[str]) -> list[tuple]:
    """(name, expectation) pairs for one split; checks on a missing column are left out."""
    from great_expectations import expectations as gxe

    v, label, roles = params.validate_, params.data.label_column, text_roles(params)
    with_labels = params.task != CAUSAL_LM
    checks = [(f"{role}_column_exists", gxe.ExpectColumnToExist(column=c)) for role, c in roles.items()]
    if with_labels:
        checks.append(("label_column_exists", gxe.ExpectColumnToExist(column=label)))
    for role, column in roles.items():
        checks += text_checks(role, column, params) if column in columns else []
    repeats, leaked = derived_names(params)
    if v.max_duplicate_share is not None and repeats in columns:  # mostly: share that must be null
        dup = gxe.ExpectColumnValuesToBeNull(column=repeats, mostly=1 - v.max_duplicate_share)
        checks.append(("duplicate_share", dup))
    if v.check_leakage and leaked in columns:
        checks.append(("no_leakage_from_train", gxe.ExpectColumnValuesToBeNull(column=leaked)))
    checks += same_answer_checks(columns)  # preferences: rejected differs from chosen
    if with_labels and label in columns:
        checks.append(("label_not_null", gxe.ExpectColumnValuesToNotBeNull(column=label)))
    # No label set (causal_lm, or train lacks the column: a check failed already): no in-set check.
    if label in columns and labels:
        in_set = gxe.ExpectColumnValuesToBeInSet(column=label, value_set=labels)
        checks.append(("label_in_set", in_set))
    return [(f"{split}/{name}", exp) for name, exp in checks]


def build_checks(derived: dict[str, pd.DataFrame], params: Params, labels: list[str]) -> dict:
    """Checks per table GX validates: {table: [(check name, expectation), ...]}."""
    from great_expectations import expectations as gxe

    checks = {s: split_checks(s, derived[s].columns, params, labels) for s in SPLITS}
    v, balance = params.validate_, []
    if v.min_rows_per_class is not None:
        at_least = gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=v.min_rows_per_class)
        balance.append(("train/min_rows_per_class", at_least))
    if v.max_majority_share is not None:
        at_most = gxe.ExpectColumnValuesToBeBetween(column="share", max_value=v.max_majority_share)
        balance.append(("train/majority_share", at_most))
    if BALANCE in derived and balance:
        checks[BALANCE] = balance
    return checks


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
