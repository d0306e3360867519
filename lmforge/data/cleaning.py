"""Cleaning a table read by ingest: labels as strings, Unicode and whitespace, empty and duplicate rows.

Used by stages/ingest.py. For task causal_lm the text columns are ``data.text_column`` (plain text)
or ``data.prompt_column`` and ``data.response_column`` (pairs), and there is no label.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from lmforge.common import UserError
from lmforge.params import Cleaning, Data
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION


def text_columns(data: Data, task: str) -> dict[str, str]:
    """The columns holding text, keyed by the params key naming each."""
    if data.chat is not None:  # conversations (lmforge/data/conversations.py)
        return {"data.chat": "messages"}
    if task == CAUSAL_LM and data.pairs:
        rejected = {"data.rejected_column": data.rejected_column} if data.rejected_column else {}
        return {"data.prompt_column": data.prompt_column, "data.response_column": data.response_column,
                **rejected}  # preferences: the rejected answer is cleaned and checked alike
    return {"data.text_column": data.text_column}


def row_key(data: Data, task: str) -> list[str]:
    """The columns that make two rows exact duplicates (classification: text and label)."""
    label = [] if task == CAUSAL_LM else [data.label_column]
    return [*text_columns(data, task).values(), *label]


def spells_number(v: object) -> bool:
    # A CSV column holding 1 and "pos" arrives as strings: "1" counts as the number it spells.
    if isinstance(v, str):
        return re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", v) is not None
    return isinstance(v, (int, float, np.integer, np.floating))


def labels_as_strings(labels: pd.Series, where: str) -> pd.Series:
    """Labels become strings (ints stay readable: 1.0 from a CSV with gaps becomes '1'); nulls stay."""
    present = labels.dropna()
    is_num = present.map(spells_number).astype(bool)
    if is_num.any() and not is_num.all():
        examples = [present[is_num].iloc[0], present[~is_num].iloc[0]]
        raise UserError(
            f"{where}: label column mixes numbers and strings ({int(is_num.sum())} numeric, "
            f"{int((~is_num).sum())} text, e.g. {examples!r}); use one kind"
        )

    def fmt(v: object) -> object:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)

    return labels.map(fmt, na_action="ignore").astype("string")


def collapse_lines(t: str) -> str:
    """Collapse runs of whitespace within each line and trim it, keeping the line breaks.

    A language model learns line structure (verse, dialogue, code) too, so causal_lm text keeps its
    line breaks where classification text becomes one line; leading/trailing blank lines go.
    """
    return "\n".join(" ".join(line.split()) for line in t.splitlines()).strip("\n")


def clean_texts(texts: pd.Series, cfg: Cleaning, keep_lines: bool = False) -> pd.Series:
    """Normalize and collapse whitespace (per line when keep_lines); nulls stay null so drop_empty
    can count them."""

    def one(t: object) -> object:
        if t is None or t is pd.NA or (isinstance(t, float) and np.isnan(t)):
            return pd.NA
        t = str(t)
        if cfg.unicode_form:
            t = unicodedata.normalize(cfg.unicode_form, t)
        if cfg.collapse_whitespace:
            t = collapse_lines(t) if keep_lines else " ".join(t.split())
        return t

    return texts.map(one).astype("string")


def clean_table(
    df: pd.DataFrame, data: Data, task: str = CLASSIFICATION
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean one table; return it and the rows dropped per reason.

    A row is empty when any text column (causal_lm pairs: prompt or response) is null or blank.
    """
    df, columns = df.copy(), list(text_columns(data, task).values())
    for c in columns:
        df[c] = clean_texts(df[c], data.clean, keep_lines=task == CAUSAL_LM)
    dropped = {"empty": 0, "duplicate": 0}
    if data.clean.drop_empty:
        empty = pd.concat([df[c].isna() | (df[c].str.strip() == "") for c in columns], axis=1)
        empty = empty.fillna(True).any(axis=1)
        dropped["empty"] = int(empty.sum())
        df = df[~empty]
    if data.clean.drop_duplicates:
        dup = df.duplicated(subset=row_key(data, task), keep="first")
        dropped["duplicate"] = int(dup.sum())
        df = df[~dup]
    return df.reset_index(drop=True), dropped


def label_set(train_labels, given: list[str] | None) -> list[str]:
    """The labels in id order: as given in params, else sorted from train (numerically if all ints)."""
    if given is not None:
        return list(given)
    import pandas as pd

    labels = sorted({str(v) for v in train_labels if pd.notna(v)})
    if labels and all(s.lstrip("-").isdigit() for s in labels):
        labels.sort(key=int)
    return labels
