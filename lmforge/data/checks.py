"""Stage validate's checks: each split's expectations by name, and the derived columns behind them.

Every check has a stable name ``<split>/<check>``. Checks Great Expectations has no expectation
for are computed here into a column; both engines (stages/validate.py locally, batch by batch;
lmforge/data/spark.py on Spark) hand the same tables to the same expectations.
"""

from __future__ import annotations

import pandas as pd

from lmforge.alignment.checks import same_answer_checks, with_same_answers
from lmforge.common import SPLITS
from lmforge.data.hashing import SeenRows, row_hashes
from lmforge.params import Params
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


def train_keys(batches, params: Params) -> SeenRows | None:
    """The hashes of train's key texts (the text, or a pair's prompt), for the leakage checks;
    None when train lacks the column (a check on it fails already)."""
    column, keys = list(text_roles(params).values())[0], SeenRows()
    for df in batches:
        if column not in df:
            return None
        keys.add(row_hashes(df[df[column].notna()], [column]))
    return keys


def with_derived(df: pd.DataFrame, seen: SeenRows, train: SeenRows | None, params: Params) -> pd.DataFrame:
    """A batch of a split plus its repeats column and (validation/test: ``train`` given) its leakage
    column. Each holds the key text (the text, or a pair's prompt) where the row repeats an earlier
    row of the split (``seen`` remembers the split's earlier batches) / appears in train, else null.
    """
    columns = list(text_roles(params).values())
    if not set(columns) <= set(df.columns):
        return df
    repeats, leaked = derived_names(params)
    key = df[columns[0]]
    repeat = pd.Series(~seen.first_seen(row_hashes(df, columns)), index=df.index)
    df = df.assign(**{repeats: key.where(repeat)})
    if train is not None:
        df[leaked] = key.where(pd.Series(train.contains(row_hashes(df, columns[:1])), index=df.index))
    return df


def balance_table(train_labels: pd.Series, labels: list[str], train_rows: int) -> pd.DataFrame:
    """One row per class of the label set (zero counts included): its train rows and share."""
    rows = train_labels.reindex(labels, fill_value=0).to_numpy()
    return pd.DataFrame({"class": labels, "rows": rows, "share": rows / max(train_rows, 1)})


def derive_frames(frames: dict[str, pd.DataFrame], params: Params, labels: list[str]) -> dict:
    """The tables GX validates: each split plus the derived columns, and the class-balance table."""
    label, train = params.data.label_column, frames["train"]
    keys = train_keys([train], params)
    out = {s: with_same_answers(with_derived(df, SeenRows(), keys if s != "train" else None, params),
                                params.data)
           for s, df in frames.items()}
    if params.task != CAUSAL_LM and label in train:
        out[BALANCE] = balance_table(train[label].value_counts(), labels, len(train))
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


def balance_checks(params: Params) -> list[tuple]:
    """The train class-balance checks, on the class-balance table."""
    from great_expectations import expectations as gxe

    v, balance = params.validate_, []
    if v.min_rows_per_class is not None:
        at_least = gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=v.min_rows_per_class)
        balance.append(("train/min_rows_per_class", at_least))
    if v.max_majority_share is not None:
        at_most = gxe.ExpectColumnValuesToBeBetween(column="share", max_value=v.max_majority_share)
        balance.append(("train/majority_share", at_most))
    return balance


def build_checks(derived: dict[str, pd.DataFrame], params: Params, labels: list[str]) -> dict:
    """Checks per table GX validates: {table: [(check name, expectation), ...]}."""
    checks = {s: split_checks(s, derived[s].columns, params, labels) for s in SPLITS}
    balance = balance_checks(params)
    if BALANCE in derived and balance:
        checks[BALANCE] = balance
    return checks
