"""What stage validate checks on preference rows (``data.rejected_column`` set): the rejected
answer present, not blank and within the length bounds (validate's text checks, run on it as on the
prompt and the chosen response), and not identical to the chosen one (below). Leakage is the pairs'
check: no validation or test prompt in train.
"""

from __future__ import annotations

import pandas as pd

from lmforge.params import Data

SAME_ANSWERS = "rejected_equals_chosen"  # derived column: the prompt where both answers are equal


def with_same_answers(df: pd.DataFrame, data: Data) -> pd.DataFrame:
    """``df`` plus a column holding the prompt of each row whose rejected answer equals the chosen
    one (whitespace aside), null elsewhere; unchanged without preference columns."""
    columns = [data.prompt_column, data.response_column, data.rejected_column]
    if data.rejected_column is None or not set(columns) <= set(df.columns):
        return df
    chosen = df[data.response_column].astype("string").str.strip()
    same = chosen == df[data.rejected_column].astype("string").str.strip()
    return df.assign(**{SAME_ANSWERS: df[data.prompt_column].where(same.fillna(False))})


def same_answer_checks(columns) -> list[tuple]:
    """validate's (name, expectation) for the derived column, when the split has it."""
    from great_expectations import expectations as gxe

    if SAME_ANSWERS not in columns:
        return []
    return [("rejected_differs_from_chosen", gxe.ExpectColumnValuesToBeNull(column=SAME_ANSWERS))]
